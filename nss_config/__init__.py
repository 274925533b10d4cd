"""Where per-extension 2FA settings come from, looked up like nsswitch.

An ordered chain of sources (``yaml``, ``ldap``); each answers found, not here, or
could not ask. See ``nss_config.base`` for the contract and ``nss_config.chain``
for how answers combine.
"""
