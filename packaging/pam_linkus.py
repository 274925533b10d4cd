"""pam-linkus: the file pam_python loads (installed as /lib/security/pam_linkus.py).

It only puts the installed package on sys.path and hands over to
pam_linkus.pam_face. If that import fails (a half-finished upgrade, a missing
dependency), every entry point refuses with PAM_AUTHINFO_UNAVAIL and says why in
syslog: a broken install must never let a login through, and must never raise
into pam_python.
"""

import sys

_SITE = "@SITE@"  # replaced by the installer with the package's site directory

if _SITE and not _SITE.startswith("@") and _SITE not in sys.path:
    sys.path.insert(0, _SITE)

try:
    from pam_linkus.pam_face import (
        pam_sm_acct_mgmt,
        pam_sm_authenticate,
        pam_sm_chauthtok,
        pam_sm_close_session,
        pam_sm_open_session,
        pam_sm_setcred,
    )
except Exception as _exc:  # noqa: BLE001 - anything that breaks the import must refuse logins
    _IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"

    def _refuse(pamh, flags, argv):  # type: ignore[no-untyped-def]
        import syslog

        syslog.syslog(syslog.LOG_AUTHPRIV | syslog.LOG_ERR,
                      f"pam_linkus: cannot load the module, login refused: {_IMPORT_ERROR}"[:500])
        return pamh.PAM_AUTHINFO_UNAVAIL

    pam_sm_authenticate = _refuse

    def pam_sm_setcred(pamh, flags, argv):  # type: ignore[no-untyped-def]
        return pamh.PAM_IGNORE

    pam_sm_acct_mgmt = pam_sm_open_session = pam_sm_close_session = pam_sm_chauthtok = pam_sm_setcred
