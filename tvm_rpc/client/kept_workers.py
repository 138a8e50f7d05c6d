"""
The tokens of server workers kept for this process's next sessions.

Our server may keep the worker process of a session for the same client's
next session on that server (C{Goodbye(keep=True)} answers a token; the next
handshake presents it as C{-resume=}): a tuning loop's next candidate then
skips the server's fork, a fresh process's first steps and its exit. This
process remembers the tokens by server address, each until the server's
C{keep_for} has passed; L{KEPT_WORKERS} is the store L{connect} uses.
"""

import time

import attrs


@attrs.define
class KeptWorkers:
    """
    Tokens of kept workers by server address (C{host:port}), newest last.

    @ivar now: the clock deadlines are read on (seconds).
    @ivar per_address: tokens kept per address at most (a server running
        several sessions at once may keep a worker for each).
    @ivar addresses: addresses remembered at most; the least recently kept
        one is forgotten first.
    """

    now: object = time.monotonic
    per_address: int = 8
    addresses: int = 1024
    _tokens: dict = attrs.field(init=False, factory=dict)

    def keep(self, address, token, keep_for):
        """
        Remember a token a server answered.

        @param address: the server's C{host:port}.
        @param token: the token.
        @param keep_for: seconds the server keeps the worker waiting.
        """
        if not (address and token and keep_for and keep_for > 0):
            return
        tokens = self._live(self._tokens.pop(address, []))
        tokens.append((token, self.now() + keep_for))
        self._tokens[address] = tokens[-self.per_address :]
        while len(self._tokens) > self.addresses:
            del self._tokens[next(iter(self._tokens))]

    def take(self, address):
        """
        @return: the newest live token of C{address}, forgotten here (a
            token serves one session), or L{None}.
        """
        tokens = self._live(self._tokens.pop(address, []))
        if not tokens:
            return None
        token, _ = tokens.pop()
        if tokens:
            self._tokens[address] = tokens
        return token

    def _live(self, tokens):
        now = self.now()
        return [(token, deadline) for token, deadline in tokens if deadline > now]


#: The store of this process (L{tvm_rpc.client.connect.connect} uses it).
KEPT_WORKERS = KeptWorkers()

__all__ = ["KEPT_WORKERS", "KeptWorkers"]
