"""One load client of the benchmark, run as its own process (threads of one Python process
starve each other and the bench itself): pamtester logins, one after another.

    python3 bench/client.py '<json spec>'

spec: ``service``; ``users`` (one login per entry, in order, each its own fresh code
unless ``code`` is given); ``start_at`` / ``stop_at`` (epoch seconds: wait until the
first, stop starting logins at the second); ``pause`` (seconds between logins).
Prints one JSON list of [stderr verdict or "", started epoch, seconds] per login.
Bounded: at most len(users) logins and never past ``stop_at``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pam_linkus.totp import decode_secret, totp

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
PASSWORD = "Linkus-bench-pw-1"


def main() -> None:
    spec = json.loads(sys.argv[1])
    secret = decode_secret(SECRET)
    wait = spec["start_at"] - time.time()
    if wait > 0:
        time.sleep(wait)
    out = []
    for user in spec["users"]:
        if time.time() >= spec["stop_at"]:
            break
        code = spec.get("code") or totp(secret, time.time())
        answers = ([PASSWORD] if spec.get("password") else []) + [code]
        started = time.time()
        t0 = time.perf_counter()
        proc = subprocess.run(["pamtester", spec["service"], user, "authenticate"],
                              input="".join(a + "\n" for a in answers).encode(), capture_output=True,
                              timeout=60, check=False)
        elapsed = time.perf_counter() - t0
        verdict = "" if proc.returncode == 0 else proc.stderr.decode(errors="replace").strip().rsplit(
            "pamtester: ", 1)[-1]
        out.append([verdict, started, elapsed])
        if spec.get("pause"):
            time.sleep(spec["pause"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
