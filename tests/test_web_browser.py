"""The Security Settings pages in headless Chromium (Debian's chromium + chromium-driver, Selenium),
against real linkusd (its web socket) and linkus-web running as a non-root user.

Screenshots of every step go to the test's tmp dir; with LINKUS_WEB_SHOTS=<dir> the main ones
are copied there too (docs/img/ was made that way).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, code_at
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from smtp_server import code_in
from web_site import Linkusd, Site, WebServer, logged, wait_for

from pam_linkus.web import strings

pytestmark = pytest.mark.timeout(180)


class Shots:
    def __init__(self, driver: Any, where: Path):
        self.driver = driver
        self.where = where
        where.mkdir(exist_ok=True)
        self.keep = os.environ.get("LINKUS_WEB_SHOTS")

    def __call__(self, name: str) -> Path:
        path = self.where / f"{name}.png"
        assert self.driver.save_screenshot(str(path))
        if self.keep:
            shutil.copy(path, Path(self.keep) / path.name)
        return path


def wait_path(driver: Any, path: str) -> None:
    WebDriverWait(driver, 20).until(lambda d: urllib.parse.urlsplit(d.current_url).path == path)


def text(driver: Any, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def fill(driver: Any, css: str, value: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, css)
    box.clear()
    box.send_keys(value)


def sign_in(driver: Any, server: WebServer, ext: str, password: str = PASSWORD) -> None:
    driver.get(server.base + "/sign-in")
    fill(driver, "#ext", ext)
    fill(driver, "#password", password)
    driver.find_element(By.CSS_SELECTOR, "#sign-in").click()


def tick_and_confirm(driver: Any, password: str = PASSWORD) -> None:
    """Tick (or untick) "Two-Factor Authentication": the page's JS goes to the Password window."""
    driver.find_element(By.CSS_SELECTOR, "#enabled").click()
    wait_path(driver, "/settings/password")
    fill(driver, "#password", password)
    driver.find_element(By.CSS_SELECTOR, "#confirm").click()


def enroll_authenticator(driver: Any, server: WebServer, site_: Site, user: str, shots: Shots) -> tuple[str, str]:
    """The whole authenticator flow; returns the secret and the code that was saved."""
    sign_in(driver, server, user)
    wait_path(driver, "/settings")
    shots("02-security-settings")
    assert text(driver, "#status-2fa") == "Off"
    driver.find_element(By.CSS_SELECTOR, "#enabled").click()
    wait_path(driver, "/settings/password")
    shots("03-password-window")
    fill(driver, "#password", PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "#confirm").click()
    wait_path(driver, "/settings/method")
    shots("04-choose-method")
    driver.find_element(By.CSS_SELECTOR, "label[for=m-totp]").click()
    driver.find_element(By.CSS_SELECTOR, "#next").click()
    wait_path(driver, "/settings/authenticator")
    qr_png = shots("05-qr-code")
    driver.find_element(By.CSS_SELECTOR, "#cant-scan summary").click()
    WebDriverWait(driver, 5).until(expected_conditions.visibility_of_element_located((By.ID, "secret")))
    shots("06-cant-scan")
    secret = text(driver, "#secret").replace(" ", "")
    assert text(driver, "#totp-note") == "Time-based, SHA1, 6 digits, every 30 seconds."
    assert site_.entry(user)["method"] == "none" and "secret" not in site_.entry(user)  # nothing saved yet

    uri = subprocess.run(["zbarimg", "--raw", "-q", str(qr_png)], capture_output=True, text=True,
                         check=True).stdout.strip()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)
    assert uri.startswith("otpauth://totp/") and f":{user}?" in uri
    assert query["secret"] == [secret] and query["digits"] == ["6"] and query["period"] == ["30"]
    assert query["algorithm"] == ["SHA1"]

    import time

    code = code_at(secret, time.time())
    fill(driver, "#code", code)
    driver.find_element(By.CSS_SELECTOR, "#save").click()
    wait_path(driver, "/settings")
    shots("07-edited-successfully")
    assert text(driver, "#notice") == "Edited successfully."
    assert text(driver, "#status-2fa") == "On"
    assert text(driver, "#status-method") == "Authenticated by Authenticator"
    assert site_.entry(user)["method"] == "totp" and site_.entry(user)["secret"] == secret
    assert secret not in driver.page_source.replace(" ", "")  # never shown again
    return secret, code


def test_authenticator_flow_switch_off_and_logs(web: tuple[Site, Linkusd, WebServer], browser: Any,
                                                user: str, tmp_path: Path) -> None:
    site_, _daemon, server = web
    site_.add(user, email="owner@example.com")
    shots = Shots(browser, tmp_path / "shots")
    browser.get(server.base + "/")
    wait_path(browser, "/sign-in")
    shots("01-sign-in")
    secret, code = enroll_authenticator(browser, server, site_, user, shots)

    # a real login through PAM (pam_unix + pam_linkus.so + linkusd): the page's code is spent
    import time

    replay = site_.stack.pamtester(user, PASSWORD, code)
    assert replay.returncode != 0, replay
    assert "replayed code" in logged(site_.log, user=user)["reason"]
    fresh = site_.stack.pamtester(user, PASSWORD, code_at(secret, time.time() + 30))  # next step, in the window
    assert fresh.returncode == 0, fresh

    # a wrong password in the Password window changes nothing
    browser.find_element(By.CSS_SELECTOR, "#enabled").click()
    wait_path(browser, "/settings/password")
    fill(browser, "#password", "not-the-password")
    browser.find_element(By.CSS_SELECTOR, "#confirm").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "pw-error"))
    shots("08-wrong-password")
    assert "not correct" in text(browser, "#pw-error")
    assert site_.entry(user) == {"method": "totp", "secret": secret, "email": "owner@example.com"}

    # recovery codes: shown once
    browser.get(server.base + "/settings")
    browser.find_element(By.CSS_SELECTOR, "#new-recovery").click()
    wait_path(browser, "/settings/password")
    fill(browser, "#password", PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "#confirm").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "codes"))
    shots("09-recovery-codes")
    codes = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#codes code")]
    assert len(codes) == 10 and all(re.fullmatch(r"[a-z2-7]{5}-[a-z2-7]{5}", c) for c in codes)

    # switch off: untick, password, done; the owner gets a mail
    browser.get(server.base + "/settings")
    tick_and_confirm(browser)
    wait_path(browser, "/settings")
    shots("10-switched-off")
    assert text(browser, "#notice") == "Edited successfully. Two-factor authentication is off."
    assert text(browser, "#status-2fa") == "Off"
    entry = site_.entry(user)
    assert entry.get("enabled") is False and "secret" not in entry
    _smtp = site_  # the mail goes to the address on file
    assert logged(site_.log, action="disable", ext=user)["via"] == "web"

    # nothing secret in any line of the web server's log (access lines are method, path, status)
    log = server.log_text()
    assert "GET /settings 200" in log and "POST /settings/confirm 303" in log
    for secret_text in (PASSWORD, "not-the-password", secret, code, *codes):
        assert secret_text not in log
        assert all(secret_text not in line for line in site_.log.lines)


def test_email_flow(web: tuple[Site, Linkusd, WebServer], site: tuple[Site, Any], browser: Any, user: str,
                    tmp_path: Path) -> None:
    site_, _daemon, server = web
    smtp = site[1]
    site_.add(user, email="owner@example.com")
    shots = Shots(browser, tmp_path / "shots")
    open_email_step(browser, server, user)
    assert text(browser, "#on-file") == "o***@example.com"
    browser.find_element(By.CSS_SELECTOR, "#send").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "sent"))
    shots("11-email-sent")
    mail = smtp.wait_for_message(1)
    assert mail["to"] == ["owner@example.com"]
    fill(browser, "#code", code_in(mail))
    browser.find_element(By.CSS_SELECTOR, "#save").click()
    wait_path(browser, "/settings")
    shots("12-email-saved")
    assert text(browser, "#notice") == "Edited successfully."
    assert text(browser, "#status-method") == "Authenticated by Email"
    assert site_.entry(user) == {"method": "email", "email": "owner@example.com"}
    # signing in again: the login flow mails a code and the page says where it went
    browser.find_element(By.CSS_SELECTOR, "header button.link").click()
    wait_path(browser, "/sign-in")
    sign_in(browser, server, user)
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "verify"))
    assert "o***@example.com" in text(browser, "#info-1")
    fill(browser, "#code", code_in(smtp.wait_for_subject("Verification code", 2)))
    browser.find_element(By.CSS_SELECTOR, "#verify").click()
    wait_path(browser, "/settings")
    # the enrollment and switching off mail the owner (pam_linkus.notify)
    assert smtp.wait_for_subject("New two-factor method")["to"] == ["owner@example.com"]
    tick_and_confirm(browser)
    wait_path(browser, "/settings")
    notice = smtp.wait_for_subject("switched off")
    assert notice["to"] == ["owner@example.com"] and len(smtp.messages) == 4


def http(server: WebServer, method: str, path: str, cookie: str = "", form: dict[str, str] | None = None
         ) -> tuple[int, str]:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(server.base + path, data=data, method=method)
    if cookie:
        request.add_header("Cookie", cookie)
    if data is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode() + str(exc.headers.get("Location", ""))


def test_csrf_expired_session_other_extensions_and_headers(web: tuple[Site, Linkusd, WebServer], browser: Any,
                                                           make_user: Any, user: str, tmp_path: Path) -> None:
    site_, _daemon, server = web
    other = make_user()
    subprocess.run(["chpasswd"], input=f"{other}:Other-pw-{os.getpid()}\n", text=True, check=True)
    site_.add(user)
    site_.add(other)
    sign_in(browser, server, user)
    wait_path(browser, "/settings")
    cookie = f"linkus_session={browser.get_cookie('linkus_session')['value']}"
    assert browser.get_cookie("linkus_session")["httpOnly"] is True
    assert browser.get_cookie("linkus_session")["sameSite"] == "Strict"

    # a form posted without its CSRF token (or with another) is refused and changes nothing
    status, page = http(server, "POST", "/settings/password", cookie, {"for": "disable", "password": PASSWORD})
    assert status == 400 and "could not be accepted" in page
    status, page = http(server, "POST", "/settings/password", cookie,
                        {"for": "enable", "password": PASSWORD, "csrf": "A" * 43})
    assert status == 400
    assert http(server, "GET", "/settings/method", cookie)[0] == 409  # no enrollment was opened
    # only small urlencoded bodies are parsed (no multipart parser: CVE-2024-24762 in bookworm's)
    assert http(server, "POST", "/settings/password", cookie, {"for": "enable", "pad": "x" * 9000})[0] == 400
    multipart = urllib.request.Request(server.base + "/settings/password", method="POST",
                                       data=b"--b\r\nContent-Disposition: form-data; name=for\r\n\r\nenable\r\n--b--",
                                       headers={"Cookie": cookie, "Content-Type": "multipart/form-data; boundary=b"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(multipart, timeout=20)
    assert refused.value.code == 400
    assert logged(site_.log, action="csrf-refused")["ext"] == user

    # another user's extension: not with this user's password, and never root or a system account
    for name in (other, "root"):
        sign_in(browser, server, name)
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "form-error"))
        assert text(browser, "#form-error") == "The extension or password is not correct."

    # an ended session is refused (sign-out, then the old cookie; a forged one)
    status, _page = http(server, "GET", "/settings", cookie)
    assert status == 200
    _status, page = http(server, "GET", "/settings", cookie)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    assert http(server, "POST", "/sign-out", cookie, {"csrf": csrf.group(1)})[0] == 303
    status, where = http(server, "GET", "/settings", cookie)
    assert status == 303 and where.endswith("/sign-in?expired=1")
    assert http(server, "GET", "/settings", "linkus_session=" + "x" * 43)[0] == 303
    browser.delete_all_cookies()
    browser.get(server.base + "/sign-in?expired=1")
    assert "Your session has ended" in browser.page_source

    # headers: CSP without inline script, no framing, no caching
    request = urllib.request.Request(server.base + "/sign-in")
    with urllib.request.urlopen(request, timeout=20) as response:
        headers = response.headers
        body = response.read().decode()
    csp = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
    assert "<script>" not in body and re.search(r"<[^>]+\son[a-z]+=", body) is None  # no inline JS
    assert all(f'for="{name}"' in body for name in ("ext", "password"))


def test_web_runs_unprivileged_and_shows_unavailable(web: tuple[Site, Linkusd, WebServer], browser: Any,
                                                     user: str, tmp_path: Path) -> None:
    site_, daemon, server = web
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M)
    assert uids is not None and all(int(u) != 0 for u in uids.groups())
    read = subprocess.run([*server.as_user(), "cat", str(site_.config_path)], capture_output=True, text=True,
                          check=False)
    assert read.returncode != 0 and "Permission denied" in read.stderr
    as_root = subprocess.run(["/usr/bin/python3", "-m", "pam_linkus.web.app", "--listen", "127.0.0.1:1"],
                             capture_output=True, text=True, check=False,
                             env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert as_root.returncode == 2 and "refusing to run as root" in as_root.stderr

    site_.add(user)
    daemon.stop()
    sign_in(browser, server, user)
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "message"))
    Shots(browser, tmp_path / "shots")("13-unavailable")
    assert browser.find_element(By.ID, "message").get_attribute("data-kind") == "unavailable"
    assert "cannot be reached" in text(browser, "#message")


def test_sign_in_with_a_code_and_the_locked_page(web: tuple[Site, Linkusd, WebServer], browser: Any, user: str,
                                                 tmp_path: Path) -> None:
    import time

    site_, _daemon, server = web
    secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    site_.stack.write_config(lockout={"max_failures": 2, "duration": 900})
    site_.add(user, method="totp", secret=secret)
    shots = Shots(browser, tmp_path / "shots")
    sign_in(browser, server, user)
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "verify"))
    shots("14-sign-in-code")
    assert browser.find_element(By.CSS_SELECTOR, "label[for=code]").text == "Authentication Code"
    fill(browser, "#code", code_at(secret, time.time()))
    browser.find_element(By.CSS_SELECTOR, "#verify").click()
    wait_path(browser, "/settings")
    assert text(browser, "#status-method") == "Authenticated by Authenticator"
    assert text(browser, "#status-last") != "never"  # the page's sign-in was a successful login

    wrong = "000000" if code_at(secret, time.time()) != "000000" else "111111"
    for attempt in range(2):
        sign_in(browser, server, user)
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "verify"))
        fill(browser, "#code", wrong)
        browser.find_element(By.CSS_SELECTOR, "#verify").click()
        if attempt == 0:
            WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "form-error"))
            assert text(browser, "#form-error") == "That code is not correct. Sign in again."
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "message"))
    shots("15-locked")
    assert browser.find_element(By.ID, "message").get_attribute("data-kind") == "locked"
    assert "locked" in text(browser, "#message")
    assert site_.stack.pamtester(user, PASSWORD, code_at(secret, time.time() + 30)).returncode != 0  # everywhere


def test_keyboard_only_and_without_javascript(web: tuple[Site, Linkusd, WebServer], browser_without_js: Any,
                                              user: str) -> None:
    import time

    from selenium.webdriver.common.keys import Keys

    site_, _daemon, server = web
    site_.add(user)
    driver = browser_without_js
    driver.get(server.base + "/sign-in")
    driver.switch_to.active_element.send_keys(user, Keys.TAB, PASSWORD, Keys.ENTER)  # the extension has focus
    wait_path(driver, "/settings")
    driver.find_element(By.CSS_SELECTOR, "#enabled").send_keys(Keys.SPACE)  # ticked; no script submits it
    assert urllib.parse.urlsplit(driver.current_url).path == "/settings"
    driver.find_element(By.CSS_SELECTOR, "#edit-2fa").send_keys(Keys.ENTER)
    wait_path(driver, "/settings/password")
    driver.switch_to.active_element.send_keys(PASSWORD, Keys.ENTER)  # the password field has focus
    wait_path(driver, "/settings/method")
    driver.find_element(By.CSS_SELECTOR, "#next").send_keys(Keys.ENTER)  # Authenticator is preselected
    wait_path(driver, "/settings/authenticator")
    driver.find_element(By.CSS_SELECTOR, "#cant-scan summary").send_keys(Keys.ENTER)
    secret = text(driver, "#secret").replace(" ", "")
    driver.find_element(By.CSS_SELECTOR, "#code").send_keys(code_at(secret, time.time()), Keys.ENTER)
    wait_path(driver, "/settings")
    assert text(driver, "#notice") == "Edited successfully."
    assert site_.entry(user)["secret"] == secret


def test_tls_and_unix_socket(web: tuple[Site, Linkusd, WebServer], ca: Any, tmp_path: Path) -> None:
    import http.client
    import socket
    import ssl

    site_, _daemon, _plain = web
    tls = WebServer(site_, tmp_path / "tls")
    (tmp_path / "tls").mkdir()
    try:
        pem = site_.root / "run" / "web-tls.pem"  # readable by the web user only
        pem.write_bytes(Path(ca.pems["good"]).read_bytes())
        shutil.chown(pem, tls.user)
        pem.chmod(0o400)
        tls.start("--tls-cert", str(pem), "--tls-key", str(pem))
        context = ssl.create_default_context(cafile=str(ca.ca_file))
        with urllib.request.urlopen(f"https://localhost:{tls.port}/sign-in", context=context, timeout=20) as response:
            assert response.status == 200
            assert "Secure" in response.headers["Set-Cookie"] and "HttpOnly" in response.headers["Set-Cookie"]
            assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    finally:
        tls.stop()

    unix = WebServer(site_, tmp_path / "unix")
    (tmp_path / "unix").mkdir()
    sock_dir = site_.root / "run" / "http"
    sock_dir.mkdir()
    shutil.chown(sock_dir, unix.user)
    try:
        unix.start("--unix", str(sock_dir / "http.sock"), "--trust-proxy")

        class UnixConnection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(sock_dir / "http.sock"))

        conn = UnixConnection("localhost", timeout=20)
        conn.request("GET", "/sign-in?expired=1", headers={"X-Forwarded-For": "198.51.100.23"})
        response = conn.getresponse()
        assert response.status == 200 and "Your session has ended" in response.read().decode()
        conn.close()
        wait_for(lambda: "GET /sign-in 200" in unix.log_text(), "the access line")  # without the query string
        assert "expired" not in unix.log_text()
    finally:
        unix.stop()


def narrow(driver: Any) -> None:
    """A 375 px wide phone screen (Chromium's device emulation; a headless window cannot be that narrow)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 375, "height": 740, "deviceScaleFactor": 1, "mobile": True})


def fits(driver: Any) -> bool:
    return bool(driver.execute_script("return document.documentElement.scrollWidth <= 375"))


def focused(driver: Any) -> str:
    return str(driver.switch_to.active_element.get_attribute("id"))


def test_narrow_screen_focus_wording_and_the_code_step(web: tuple[Site, Linkusd, WebServer], browser: Any,
                                                       user: str, tmp_path: Path) -> None:
    """Issue 17.5: every page fits 375 px, focus goes where the next keystroke belongs, a wrong
    sign-in keeps the extension, "1 try left", and a sign-in waiting for its code goes back to it."""
    import time

    site_, _daemon, server = web
    site_.add(user, email="a.rather.long.address.for.a.phone@example.com")
    shots = Shots(browser, tmp_path / "shots")
    narrow(browser)
    sign_in(browser, server, user, "not-the-password")
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "form-error"))
    assert browser.find_element(By.ID, "ext").get_attribute("value") == user  # kept after a wrong sign-in
    assert focused(browser) == "password" and fits(browser)
    fill(browser, "#password", PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "#sign-in").click()
    wait_path(browser, "/settings")
    assert fits(browser), browser.execute_script("return document.documentElement.scrollWidth")
    tick_and_confirm(browser)
    wait_path(browser, "/settings/method")
    browser.find_element(By.CSS_SELECTOR, "#next").click()
    wait_path(browser, "/settings/authenticator")
    assert focused(browser) == "code" and fits(browser)  # after Next: the code field
    browser.find_element(By.CSS_SELECTOR, "#cant-scan summary").click()
    secret = text(browser, "#secret").replace(" ", "")
    assert fits(browser)
    wrong = "000000" if code_at(secret, time.time()) not in ("000000", "111111") else "222222"
    for left in ("2 tries left", "1 try left"):
        fill(browser, "#code", wrong)
        browser.find_element(By.CSS_SELECTOR, "#save").click()
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "code-error"))
        assert f"({left})" in text(browser, "#code-error")
        assert focused(browser) == "code"  # after a wrong code: the field, told why by the error
        assert "code-error" in str(browser.find_element(By.ID, "code").get_attribute("aria-describedby"))
    fill(browser, "#code", code_at(secret, time.time()))
    browser.find_element(By.CSS_SELECTOR, "#save").click()
    wait_path(browser, "/settings")
    shots("16-narrow-saved")
    assert focused(browser) == "notice" and fits(browser)  # after Save: the result is read out

    # signed out, then the password but not yet the code: every page leads back to the code
    browser.find_element(By.CSS_SELECTOR, "header button.link").click()
    wait_path(browser, "/sign-in")
    sign_in(browser, server, user)
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "verify"))
    for path in ("/", "/settings", "/settings/method"):
        browser.get(server.base + path)
        wait_path(browser, "/sign-in/code")
        assert browser.find_elements(By.ID, "verify") and focused(browser) == "code"
    fill(browser, "#code", code_at(secret, time.time() + 30))
    browser.find_element(By.CSS_SELECTOR, "#verify").click()
    wait_path(browser, "/settings")


def post_raw(server: WebServer, path: str, cookie: str, body: bytes, content_type: str | None) -> tuple[int, str]:
    """A POST with any body and Content-Type (or none); redirects are not followed."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    headers = {"Cookie": cookie}
    if content_type is not None:
        headers["Content-Type"] = content_type
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, str(response.getheader("Location", ""))
    finally:
        conn.close()


@pytest.mark.parametrize(("body", "content_type"), [
    (b"", None), (b"", "application/x-www-form-urlencoded"), (b"csrf=stale", "text/plain"),
    (b"csrf=a&csrf=b", "application/x-www-form-urlencoded"), (b"x" * 9000, "application/x-www-form-urlencoded"),
], ids=["no-body", "empty-form", "text-plain", "two-tokens", "too-big"])
def test_sign_out_ends_the_session_whatever_the_body(web: tuple[Site, Linkusd, WebServer], user: str,
                                                     body: bytes, content_type: str | None) -> None:
    """Issue 17/6: POST /sign-out ends the session in linkusd even when its form cannot be read."""
    from pam_linkus import protocol

    site_, _daemon, server = web
    site_.add(user)
    signed = protocol.call_web(str(site_.web_socket), {"op": "sign_in", "ext": user, "password": PASSWORD,
                                                       "client": "192.0.2.1"})
    assert signed["ok"], signed
    cookie = f"linkus_session={signed['session']}"
    assert http(server, "GET", "/settings", cookie)[0] == 200
    assert post_raw(server, "/sign-out", cookie, body, content_type) == (303, "/sign-in")
    assert protocol.call_web(str(site_.web_socket), {"op": "status", "session": signed["session"]}) == {
        "ok": False, "error": "expired"}
    status, where = http(server, "GET", "/settings", cookie)
    assert (status, where.endswith("/sign-in?expired=1")) == (303, True)


def test_wrong_sign_in_code_focus_and_the_code_step_on_post(web: tuple[Site, Linkusd, WebServer], browser: Any,
                                                          user: str) -> None:
    """Issue 17/7 at 375 px: a wrong sign-in code comes back to /sign-in with the extension kept and the
    password focused; Choose-method has a focused control; a POST page during the code step leads there."""
    import time

    site_, _daemon, server = web
    secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    site_.add(user, method="totp", secret=secret)
    narrow(browser)
    sign_in(browser, server, user)
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "verify"))
    wrong = "000000" if code_at(secret, time.time()) not in ("000000", "111111") else "222222"
    fill(browser, "#code", wrong)
    browser.find_element(By.CSS_SELECTOR, "#verify").click()
    wait_path(browser, "/sign-in")
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "form-error"))
    assert text(browser, "#form-error") == "That code is not correct. Sign in again."
    assert browser.find_element(By.ID, "ext").get_attribute("value") == user
    assert focused(browser) == "password" and fits(browser)

    # the password only (the code step): a POST page leads to the code step, not to "step expired"
    fill(browser, "#password", PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "#sign-in").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "verify"))
    cookie = f"linkus_session={browser.get_cookie('linkus_session')['value']}"
    for path, form in (("/settings/password", {"csrf": "x", "password": PASSWORD, "for": "disable"}),
                       ("/settings/2fa", {"csrf": "x", "enabled": "on"}),
                       ("/settings/method", {"csrf": "x", "method": "totp"}),
                       ("/settings/confirm", {"csrf": "x", "code": "123456"})):
        status, where = http(server, "POST", path, cookie, form)
        assert (status, where.endswith("/sign-in/code")) == (303, True), (path, status, where)
    fill(browser, "#code", code_at(secret, time.time() + 30))
    browser.find_element(By.CSS_SELECTOR, "#verify").click()
    wait_path(browser, "/settings")

    # switch off and on again: the Choose-method page after the Password window has its focus on the choice
    tick_and_confirm(browser)
    wait_path(browser, "/settings")
    tick_and_confirm(browser)
    wait_path(browser, "/settings/method")
    assert focused(browser) == "m-totp" and fits(browser)


def open_email_step(browser: Any, server: WebServer, user: str) -> None:
    """Sign in (2FA off), tick the box, confirm the password, choose Email: the page with Send."""
    sign_in(browser, server, user)
    wait_path(browser, "/settings")
    tick_and_confirm(browser)
    wait_path(browser, "/settings/method")
    browser.find_element(By.CSS_SELECTOR, "label[for=m-email]").click()
    browser.find_element(By.CSS_SELECTOR, "#next").click()
    wait_path(browser, "/settings/email")


def test_send_without_an_address_when_none_is_on_file_asks_for_one(web: tuple[Site, Linkusd, WebServer],
                                                                    browser: Any, user: str) -> None:
    """Send with the field empty and no address on file: the page asks for an address (it said "the
    form could not be accepted")."""
    site_, _daemon, server = web
    site_.add(user)
    open_email_step(browser, server, user)
    # the field is required here; a client without form validation (or a script) sends it empty anyway
    browser.execute_script("document.getElementById('address').removeAttribute('required')")
    browser.find_element(By.CSS_SELECTOR, "#send").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "email-error"))
    assert text(browser, "#email-error") == strings.NO_ADDRESS


def test_email_throttle_says_wait_on_the_page(web: tuple[Site, Linkusd, WebServer], site: tuple[Site, Any],
                                              browser: Any, user: str) -> None:
    """Issues 17/1 and 17/4 on the page, with the shipped one-mail-a-minute throttle: a second Send to
    another address says nothing was sent and how long to wait (the first address stays the one to
    confirm); a sign-in right after an emailed-code sign-in says wait, never the "unavailable" page."""
    site_, _daemon, server = web
    smtp = site[1]
    site_.stack.write_config(email={**site_.stack.config["email"], "send_interval": 60})
    site_.add(user)
    open_email_step(browser, server, user)
    fill(browser, "#address", "owner-real@example.test")
    browser.find_element(By.CSS_SELECTOR, "#send").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "sent"))
    fill(browser, "#address", "attacker-typo@example.test")
    browser.find_element(By.CSS_SELECTOR, "#send").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "email-error"))
    assert text(browser, "#email-error").startswith("No new code was sent: a code can be sent again in ")
    assert text(browser, "#sent") == "A code was sent to o***@example.test. It is valid for a few minutes."
    mail = smtp.wait_for_message(1)
    fill(browser, "#code", code_in(mail))
    browser.find_element(By.CSS_SELECTOR, "#save").click()
    wait_path(browser, "/settings")
    assert site_.entry(user) == {"method": "email", "email": "owner-real@example.test"}
    assert len(smtp.with_subject("Verification code")) == 1

    site_.stack.write_config(email={**site_.stack.config["email"], "send_interval": 0})
    browser.find_element(By.CSS_SELECTOR, "header button.link").click()
    wait_path(browser, "/sign-in")
    sign_in(browser, server, user)
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "verify"))
    fill(browser, "#code", code_in(smtp.wait_for_subject("Verification code", 2)))
    browser.find_element(By.CSS_SELECTOR, "#verify").click()
    wait_path(browser, "/settings")
    site_.stack.write_config(email={**site_.stack.config["email"], "send_interval": 60})
    browser.find_element(By.CSS_SELECTOR, "header button.link").click()
    wait_path(browser, "/sign-in")
    sign_in(browser, server, user)
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "message"))
    assert browser.find_element(By.ID, "message").get_attribute("data-kind") == "throttled"
    assert "can be sent again in" in text(browser, "#message")
