"""linkusd: the long-running daemon that decides every pam-linkus login.

``main`` starts it (sockets, systemd, signals), ``server`` serves the PAM and web
sockets (peers, caps, one transaction per connection), ``engine`` holds the
config snapshot, reloads it aside and runs work in bounded pools, ``selfservice``
answers the web socket's ops for the self-service page (linkus-web, pam_linkus.web,
only asks). The login process runs only pam_linkus.so (native/), which relays the
conversation.
"""
