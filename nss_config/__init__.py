"""Where per-extension 2FA settings come from, looked up like nsswitch.

Called nss_config after nsswitch.conf: the settings of a name come from an ordered list of sources,
as glibc's name service switch finds a passwd entry.

An ordered chain of sources (``yaml``, ``ldap``); each answers found, not here, or
could not ask. See ``nss_config.base`` for the contract and ``nss_config.chain``
for how answers combine.

The lowest layer: it imports nothing from pam_linkus (tests/test_layers.py). The errors
it raises are declared in ``nss_config.errors``, the config and cache types it reads in
``nss_config.options``; ``nss_config.yaml_reader`` is the one reader of root-only YAML
and secret files, for the config above as well.
"""
