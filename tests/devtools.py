"""Headless Chromium driven over the DevTools protocol on a pipe.

C{--remote-debugging-pipe} makes Chromium read DevTools commands from its file
descriptor 3 and write answers and events to 4, each a JSON message ended by
a NUL byte: no port, no websocket client. A test loads a page once, then
watches it (its DOM, the navigations it asks for itself) without reloading it.
"""

import base64
import fcntl
import json
import os
import select
import signal
import subprocess
import tempfile
import time

#: Seconds one command or one awaited event may take.
TIMEOUT = 60.0


class DevToolsError(Exception):
    """Chromium answered a command with an error, or went away."""


def _above_stdio(fd):
    """@return: a duplicate of C{fd} numbered 10 or more (so moving the
        child's ends to 3 and 4 cannot overwrite one another); C{fd} is closed."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """
    One headless Chromium in a fresh profile, with one page attached.

    @ivar events: events received and not yet awaited, oldest first.
    """

    def __init__(self, executable, profile, *args):
        """
        Start Chromium with background network traffic off (the machine has no
        network beyond loopback) and attach to its page.

        @param executable: Chromium's path.
        @param profile: a directory for the profile.
        @param args: more command-line switches (a window size, for instance).
        """
        commands_read, commands_write = map(_above_stdio, os.pipe())
        answers_read, answers_write = map(_above_stdio, os.pipe())

        def onto_3_and_4():
            os.dup2(commands_read, 3)
            os.dup2(answers_write, 4)

        # A file, not a pipe: Chromium's log lines must never block it.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [executable, "--headless", "--disable-gpu", "--no-sandbox", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", *args, "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
            pass_fds=(3, 4), preexec_fn=onto_3_and_4, start_new_session=True,
        )
        os.close(commands_read)
        os.close(answers_write)
        self._out = commands_write
        self._in = answers_read
        self._buffer = b""
        self._next_id = 0
        self.events = []
        self.session = None
        try:
            pages = [t for t in self.call("Target.getTargets")["targetInfos"]
                     if t["type"] == "page"]
            if pages:
                target = pages[0]["targetId"]
            else:
                target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target,
                                     flatten=True)["sessionId"]
            self.call("Page.enable")
        except BaseException:
            self.close()
            raise

    def _send(self, method, params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode("utf-8") + b"\0")
        return self._next_id

    def _receive(self, deadline, awaited):
        """
        @param awaited: what is awaited, for the error.
        @return: the next message from Chromium, before C{deadline} (monotonic).
        """
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise DevToolsError(f"Chromium sent no {awaited} in time")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise DevToolsError(f"Chromium closed the DevTools pipe: {self.log()[-2000:]}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method, timeout=TIMEOUT, **params):
        """
        Send one command and wait for its answer, keeping the events that
        arrive meanwhile in L{events}.

        @return: the command's result.
        @raise DevToolsError: on an error answer, or none within C{timeout}.
        """
        number = self._send(method, params)
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline, f"answer to {method}")
            if message.get("id") == number:
                if "error" in message:
                    raise DevToolsError(f"{method}: {message['error']}")
                return message["result"]
            if "method" in message:
                self.events.append(message)

    def wait_event(self, method, timeout=TIMEOUT):
        """
        @return: the parameters of the oldest unawaited event C{method} of the
            page; earlier events of other kinds stay in L{events}.
        @raise DevToolsError: when none arrives within C{timeout}.
        """
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                if event["method"] == method:
                    del self.events[index]
                    return event.get("params", {})
            message = self._receive(deadline, f"event {method}")
            if "method" in message:
                self.events.append(message)

    def navigate(self, url):
        """Load C{url} in the page and wait until it has loaded."""
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def html(self, attempts=3):
        """
        @return: the page's DOM now, as HTML (read by DevTools, no script in
            the page).
        @param attempts: tries; a page that refreshes itself may replace its
            document between the two commands, which makes the node unknown.
        """
        for attempt in range(attempts):
            root = self.call("DOM.getDocument", depth=-1)["root"]["nodeId"]
            try:
                return self.call("DOM.getOuterHTML", nodeId=root)["outerHTML"]
            except DevToolsError:
                if attempt == attempts - 1:
                    raise

    def log(self):
        """@return: what Chromium wrote on its standard error so far."""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def screenshot(self):
        """@return: the page as it is shown, a PNG."""
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self):
        """Ask Chromium to quit; kill it when it does not within a few seconds."""
        try:
            self._send("Browser.close", {})
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            # Its own process group: the renderers go with it.
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        finally:
            os.close(self._out)
            os.close(self._in)
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
