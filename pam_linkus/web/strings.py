"""Every text the self-service pages show, in one place, ready for translation.

Templates read them as ``t.NAME``; a translation is a module with the same names
(gettext can wrap these later without touching the templates). The wording follows
the product the page imitates ("Authenticated by Authenticator", "Edited successfully.").
"""

from __future__ import annotations

LANG = "en"
PRODUCT = "Linkus"
TITLE = "Security Settings"
SIGN_IN_TITLE = "Sign in"
SIGN_IN_INTRO = "Sign in with your extension and its password to manage two-factor authentication."
EXTENSION = "Extension"
PASSWORD = "Password"  # noqa: S105 -- a label, not a password
SIGN_IN = "Sign in"
SIGN_OUT = "Sign out"
CODE_TITLE = "Two-factor authentication"
CODE_INTRO = "Enter the 6-digit code from your authenticator app or email."
VERIFY = "Verify"
AUTH_CODE = "Authentication Code"
TWO_FA = "Two-Factor Authentication"
TWO_FA_HELP = ("Protect your extension's logins with a 6-digit code from an authenticator app or sent by email, "
               "asked after your password.")
EDIT = "Edit"
ON = "On"
OFF = "Off"
METHOD = "Method"
METHOD_TOTP = "Authenticated by Authenticator"
METHOD_EMAIL = "Authenticated by Email"
ENROLLED_SINCE = "Enabled since"
LAST_SUCCESS = "Last successful login"
NEVER = "never"
UNKNOWN = "unknown"
RECOVERY_LEFT = "Recovery codes left"
RECOVERY_TITLE = "Recovery codes"
RECOVERY_NEW = "Get new recovery codes"
RECOVERY_INTRO = ("Each code works once, typed in place of the 6-digit code when your phone is not at hand. "
                  "They are shown only now: write them down or print this page. Older recovery codes no longer work.")
CHANGE_METHOD = "Change method"
PASSWORD_WINDOW = "Password"  # noqa: S105 -- a label, not a password
PASSWORD_INTRO = "Enter your password to confirm this change."  # noqa: S105 -- a label, not a password
CONFIRM = "Confirm"
CANCEL = "Cancel"
CHOOSE_METHOD = "Choose how you receive codes"
NEXT = "Next"
SCAN_QR = "Scan this QR code with your authenticator app (Google Authenticator, Microsoft Authenticator, FreeOTP...)."
QR_LABEL = "QR code for your authenticator app"
CANT_SCAN = "Can't scan?"
CANT_SCAN_INTRO = "Add the account in your app by hand with this secret key:"
ACCOUNT = "Account"
ISSUER = "Issuer"
SECRET_KEY = "Secret key"  # noqa: S105 -- a label, not a password
TOTP_NOTE = "Time-based, SHA1, 6 digits, every 30 seconds."
CODE_HINT = "Enter the 6-digit code your app shows now, then Save."
SAVE = "Save"
EMAIL_INTRO = "We send a 6-digit code to your email address; enter it below and Save."
EMAIL_ADDRESS = "Email address"
EMAIL_ADDRESS_HINT = "Leave empty to use the address on file"
EMAIL_ON_FILE = "Address on file"
EMAIL_NONE = "No address on file: enter one."
SEND = "Send"
EMAIL_SENT = "A code was sent to {address}. It is valid for a few minutes."
EDITED = "Edited successfully."
DISABLED_DONE = "Edited successfully. Two-factor authentication is off."
NOTHING_CHANGED = "Nothing was changed."
WRONG_PASSWORD = "The password is not correct. Nothing was changed."  # noqa: S105 -- a label, not a password
WRONG_SIGN_IN = "The extension or password is not correct."
WRONG_CODE = "That code is not correct. Check your app's clock and try the next code."
WRONG_CODE_LEFT = "That code is not correct ({left} tries left)."
WRONG_CODE_ENDED = "That code was not correct too many times; start again. Nothing was changed."
WRONG_SIGN_IN_CODE = "That code is not correct. Sign in again."
THROTTLED = "Too many attempts. Please wait {minutes} minutes and try again."
EXPIRED = "Your session has ended. Please sign in again."
STEP = "That step has expired or was already done. Please start again."
BAD_REQUEST = "The form could not be accepted (it may be out of date). Please try again."
BAD_ADDRESS = "That email address is not valid."
LOCKED_TITLE = "Extension locked"
LOCKED = ("Your extension is locked after too many wrong codes. It unlocks by itself at {until}, "
          "or ask your administrator.")
LOCKED_ADMIN = "Your extension is locked after too many wrong codes. Ask your administrator to unlock it."
UNAVAILABLE_TITLE = "Service unavailable"
UNAVAILABLE = ("Two-factor settings cannot be reached right now. Nothing was changed. "
               "Please try again in a few minutes, or tell your administrator.")
NOT_FOUND = "This page does not exist."
LOST_PHONE = "Lost your phone? Use a recovery code, or ask your administrator to switch 2FA off."
SKIP_LINK = "Skip to content"
BACK = "Back to Security Settings"
