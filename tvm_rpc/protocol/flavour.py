"""Telling our session protocol from Apache TVM's native one during the handshake.

The RPC handshake is TVM's, but what follows it is not: our sessions speak AMP,
TVM's speak its own RPC endpoint protocol. So each side marks itself with a
key option TVM ignores (TVM's server reads only C{-timeout=}, and its client
never parses the server key):

  - our client appends C{ -tvm_rpc=<version>} to C{client:<matchkey>};
  - our server appends the same option to C{server:<key>} in its reply;
  - our server, meeting a client without the mark (a real TVM client), serves
    it TVM's own session protocol (L{tvm_rpc.server.tvm_session}); where
    it cannot, it answers the handshake and then sends one packet of TVM's
    own protocol, an exception naming why (L{TVM_CLIENT_REFUSAL}), which
    TVM's client raises as C{RPCError};
  - our client, meeting a reply without the mark (one of TVM's servers),
    speaks TVM's own session protocol to it (L{tvm_rpc.client.tvm_engine}).
"""

from . import tvm_packets
from .keys import CLIENT_PREFIX, RESUME_OPTION, SERVER_PREFIX

#: The name of our session protocol (AMP boxes), for logs and counts.
OUR_PROTOCOL = "tvm_rpc"
#: The name of TVM's own session protocol (its RPC endpoint's packets).
TVM_PROTOCOL = "tvm"

#: The key option that marks a tvm_rpc peer.
MARKER_OPTION = "tvm_rpc"
#: Its value: the session protocol's version.
MARKER_VERSION = "1"
#: The text appended to a handshake key.
MARKER = f" -{MARKER_OPTION}={MARKER_VERSION}"

#: What a real TVM client is told when it reaches a server that runs its
#: sessions in-process (C{--in-process}): TVM's session protocol runs in a worker.
TVM_CLIENT_REFUSAL = (
    "this tvm_rpc server runs its sessions inside the daemon (--in-process) and serves "
    "only tvm_rpc's client there; Apache TVM's clients are served by session workers: "
    "restart it without --in-process, or connect with tvm_rpc.client.connect "
    "or tvm_rpc.client.connect_tracker(...).request(key)"
)


def client_key(matchkey, timeout=None, resume=None):
    """
    @param matchkey: the key or tracker matchkey to present.
    @param timeout: the session timeout in seconds, or L{None}/0 for none.
    @param resume: the token of the worker that served our previous session
        on this server (L{RESUME_OPTION}), or L{None}.
    @return: the handshake key of our client, marked.
    """
    text = CLIENT_PREFIX + matchkey
    if timeout:
        text += f" -timeout={timeout}"
    if resume:
        text += f" -{RESUME_OPTION}={resume}"
    return text + MARKER


def server_key(key):
    """@return: the key our server sends back on success, marked."""
    return SERVER_PREFIX + key + MARKER


def session_protocol(options):
    """
    @param options: the options parsed from a client's handshake key.
    @return: L{OUR_PROTOCOL} for a marked (tvm_rpc) client, else
        L{TVM_PROTOCOL}.
    """
    return OUR_PROTOCOL if MARKER_OPTION in options else TVM_PROTOCOL


def is_marked(options):
    """
    @param options: the options parsed from a handshake key.
    @return: whether the peer is a tvm_rpc peer.
    """
    return MARKER_OPTION in options


def reply_is_marked(key):
    """
    @param key: the key a server sent back in its handshake reply.
    @return: whether it carries our mark.
    """
    return MARKER.strip() in key.split()[1:]


def tvm_exception_packet(message):
    """
    One packet of TVM's RPC endpoint protocol that makes TVM's client raise.

    @param message: the error text TVM's client shows.
    @return: C{[uint64 length][int32 kException][int32 1][int32 str][uint64 n][text]}
        (what C{tvm.rpc._ffi_api.ReturnException} writes).
    """
    return tvm_packets.packet(tvm_packets.EXCEPTION, tvm_packets.encode_seq([message]))
