"""pam-linkus: Yeastar-Linkus-style second factor for every PAM login of a PBX host."""

__version__ = "0.2.0"
