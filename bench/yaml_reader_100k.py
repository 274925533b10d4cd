"""Load time and peak RSS of strict YAML for an extensions file of N extensions.

Run: python3 bench/yaml_reader_100k.py [N]   (default 100000). Each variant runs in
its own child process, so ru_maxrss is that variant's own peak.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def make(n: int) -> bytes:
    lines = ["extensions:"]
    for i in range(n):
        ext = 100000 + i
        lines.append(f'  "{ext}":\n    method: totp\n    secret: {SECRET}\n    enabled: true\n'
                     f"    email: u{ext}@example.com")
    return ("\n".join(lines) + "\n").encode()


def child(variant: str, n: int) -> None:
    data = make(n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "strict":
        from nss_config.yaml_reader import load_yaml

        result = load_yaml(data, "bench.yaml")
    else:
        import yaml

        result = yaml.load(data, Loader=yaml.CSafeLoader)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert len(result["extensions"]) == n
    print(f"{variant:<8} {n} extensions ({len(data) / 1e6:.1f} MB): {elapsed:.2f} s, "
          f"peak RSS {peak / 1024:.0f} MB (+{(peak - base) / 1024:.0f} MB over the input)")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
        return
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    for variant in ("strict", "csafe"):
        subprocess.run([sys.executable, __file__, "--child", variant, str(n)], check=True)


if __name__ == "__main__":
    main()
