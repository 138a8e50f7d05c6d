"""tvm_rpc: Apache TVM's remote-execution system (tracker, proxy, server, client) on Twisted."""

__version__ = "0.1.0"

if getattr(__spec__.loader, "archive", None):
    # Imported from a zip: the device bundle, in the server or a session
    # worker, which may see a system pyOpenSSL without service_identity.
    from .partial_tls import hide_partial_tls

    hide_partial_tls()
