"""The learner's side of the robot link: a ZeroMQ REQ client that survives a dropped connection.

Every request waits at most ``timeout_s`` for its reply (a reset with a human in the loop: as long as it
takes). No reply means the socket is closed and opened again and the request sent again, until the server
answers or ``reconnect_s`` have passed (then :class:`RobotUnavailable`, naming the address). Sending a
step twice is safe: a step names its episode, and a server that restarted (another session) or ended that
episode answers ``truncated`` without moving.

While the learner computes (SAC updates between chunks), a keep-alive thread pings the server every third
of its heartbeat, so the robot holds instead of ending the episode; when this process dies, the pings stop
and the server's heartbeat stops the robot.

Round-trip times of every request are kept per op (``latency``); fine-tuning logs their per-batch medians
(``robot/step_rtt_ms`` ...).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from app.robot.protocol import VERSION, decode, encode, parse_address


class RobotUnavailable(RuntimeError):
    """The robot server did not answer within ``reconnect_s``."""


class RobotError(RuntimeError):
    """The robot server answered with an error (a refused action, a robot fault)."""


class RobotClient:
    """A connection to the robot server at ``address`` (HOST:PORT)."""

    def __init__(
        self,
        address: str,
        timeout_s: float = 5.0,
        reconnect_s: float = 120.0,
        keepalive: bool = True,
        log: Callable[[str], None] = lambda line: print(line, flush=True),
    ) -> None:
        import zmq

        self.host, self.port = parse_address(address)
        self.address, self.timeout_s, self.reconnect_s, self.log = address, timeout_s, reconnect_s, log
        self._zmq, self._ctx = zmq, zmq.Context()
        self._sock = None
        self._lock = threading.Lock()  # one request at a time: REQ sockets alternate send and receive
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.reconnects = 0
        self.session = self.episode = None
        self._connect()
        self.spec = self._request({"op": "spec"})[0]
        if self.spec.get("version") != VERSION:
            raise RobotError(
                f"robot server at {address} speaks protocol {self.spec.get('version')}; this is {VERSION}"
            )
        self._stop = threading.Event()
        self._pinger = None
        if keepalive:
            self._pinger = threading.Thread(target=self._keepalive, name="robot-keepalive", daemon=True)
            self._pinger.start()

    # -- requests ------------------------------------------------------------------------------------
    def reset(self) -> dict[str, np.ndarray]:
        """Start an episode; its first observation."""
        wait = None if self.spec.get("human_reset") else self.timeout_s
        header, obs = self._request({"op": "reset"}, timeout_s=wait)
        self.session, self.episode = header["session"], header["episode"]
        return obs

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Apply one action: (observation, {reward, terminated, truncated, success, info})."""
        a = np.asarray(action, np.float32)
        header, obs = self._request(
            {"op": "step", "session": self.session, "episode": self.episode}, {"action": a}
        )
        return obs, header

    def ping(self) -> dict[str, Any]:
        return self._request({"op": "ping"})[0]

    def close(self) -> None:
        if self._pinger is not None:
            self._stop.set()
            self._pinger.join(timeout=1.0)
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
        self._ctx.term()

    # -- the machinery ---------------------------------------------------------------------------------
    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._ctx.socket(self._zmq.REQ)
        self._sock.setsockopt(self._zmq.LINGER, 0)
        self._sock.connect(f"tcp://{self.host}:{self.port}")

    def _request(self, header: dict[str, Any], arrays=None, timeout_s: float | None = -1.0):
        """Send, wait, reconnect and resend on silence (module docstring); the reply's (header, arrays)."""
        timeout_s = self.timeout_s if timeout_s == -1.0 else timeout_s
        frames = encode(header, arrays)
        start = time.monotonic()
        warned = False
        with self._lock:
            while True:
                sent = time.perf_counter()
                self._sock.send_multipart(frames)
                if self._sock.poll(None if timeout_s is None else int(timeout_s * 1000)):
                    reply, arrays_back = decode(self._sock.recv_multipart())
                    self.latency[header["op"]].append(time.perf_counter() - sent)
                    if warned:
                        self.log(
                            f"[tmrl] robot at {self.address} answers again after "
                            f"{time.monotonic() - start:.0f} s"
                        )
                    break
                waited = time.monotonic() - start
                if waited > self.reconnect_s:
                    raise RobotUnavailable(
                        f"the robot server at {self.address} has not answered for {waited:.0f} s "
                        f"(reconnect_s={self.reconnect_s}); is `tmrl robot-server` running there?"
                    )
                if not warned:
                    self.log(
                        f"[tmrl] robot at {self.address} not answering ({header['op']}); reconnecting for "
                        f"up to {self.reconnect_s:.0f} s"
                    )
                    warned = True
                self.reconnects += 1
                self._connect()
        if not reply.get("ok"):
            raise RobotError(f"robot server at {self.address}: {reply.get('error')}")
        return reply, arrays_back

    def _keepalive(self) -> None:
        period = max(0.05, float(self.spec.get("heartbeat_s", 2.0)) / 3)
        while not self._stop.wait(period):
            if self._lock.locked():
                continue  # a request is in flight: it is the heartbeat
            try:
                self.ping()
            except Exception:  # noqa: BLE001 - the main thread's next request reports the fault
                continue

    def take_latency_ms(self) -> dict[str, float]:
        """Median round trip per op since the last call, milliseconds (the run's per-batch metrics)."""
        with self._lock:
            out = self.latency_ms()
            self.latency.clear()
        return out

    def latency_ms(self) -> dict[str, float]:
        """Median round trip per op, milliseconds."""
        return {op: 1000 * float(np.median(ts)) for op, ts in self.latency.items() if ts}
