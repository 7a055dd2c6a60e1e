"""ACME: manager (see the package docstring)."""

from __future__ import annotations

import asyncio
import datetime
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from wakeproxy.certs.acme.client import _TLSALPN01, AcmeClient, AcmeFailure, describe
from wakeproxy.certs.acme.storage import CertStorage
from wakeproxy.certs.acme.timing import BACKOFF_MAX, BACKOFF_MIN, ari_pick, backoff_delay, renewal_time
from wakeproxy.certs.challenges import ChallengeTokens
from wakeproxy.certs.store import Certificates, LoadedCert, load_cert
from wakeproxy.config import format_duration
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.runtime import Runtime

logger = get_logger(__name__)

ARI_RECHECK = 6 * 3600.0  # how often a certificate's renewalInfo is asked again
ORDER_WINDOW = 24 * 3600.0  # acme.max_orders_per_group counts orders in this window
TEST_BACKOFF_ENV = "WAKEPROXY_ACME_TEST_BACKOFF"




# --- scheduling (event loop) ---------------------------------------------------------


@dataclass
class NameState:
    """What we know and plan for one name; `status()` shows it."""

    name: str
    container: str = ""
    group: str = ""
    cert: LoadedCert | None = None
    renew_at: datetime.datetime | None = None
    ari_checked: float = 0.0  # monotonic
    failures: int = 0
    next_attempt: float = 0.0  # wall clock; 0 = as soon as due
    last_error: str | None = None
    busy: bool = False
    phase: str = "pending"  # pending | ordering | valid | failed
    history: list[float] = field(default_factory=list)  # issuance seconds

    def due(self, now: float) -> float:
        """Wall-clock time of the next attempt."""
        if self.failures:
            return self.next_attempt
        if self.cert is None:
            return now
        assert self.renew_at is not None
        return self.renew_at.timestamp()

    def as_dict(self) -> dict[str, Any]:
        state = self.phase
        if self.phase != "ordering" and self.cert is not None:
            now = datetime.datetime.now(datetime.UTC)
            state = "valid" if self.cert.valid_at(now) else "expired"
            if self.failures:
                state += " (renewal failing)"
        iso = lambda t: datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat()  # noqa: E731
        next_attempt = self.due(time.time()) if not self.busy else None
        return {
            "state": state,
            "container": self.container,
            "not_after": self.cert.not_after.isoformat() if self.cert else None,
            "renew_at": self.renew_at.isoformat() if self.renew_at else None,
            "last_error": self.last_error,
            "failures": self.failures,
            "next_attempt": iso(next_attempt) if next_attempt else None,
            "last_issuance_seconds": round(self.history[-1], 3) if self.history else None,
        }


class AcmeManager:
    """The ACME addon: orders and renews certificates, putting the challenges into `tokens`."""

    def __init__(self, runtime: Runtime, certificates: Certificates, tokens: ChallengeTokens | None = None) -> None:
        self.runtime = runtime
        self.certificates = certificates
        self.tokens = tokens if tokens is not None else ChallengeTokens()
        self.states: dict[str, NameState] = {}
        self.client: AcmeClient | None = None
        self._orders: dict[str, list[float]] = {}  # group → times of its orders in the last 24 h
        self._capped: set[str] = set()  # groups whose cap was logged in the current window
        self._kick: asyncio.Event | None = None
        self._sem: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rng = random.Random()
        self._backoff_min = BACKOFF_MIN
        self.orders: dict[str, int] = {"issued": 0, "failed": 0}  # attempts by result (metrics)

    @property
    def enabled(self) -> bool:
        return self.runtime.config.acme.enabled

    # --- hooks (the challenge answers are certs.challenges.ChallengeAnswers, over `tokens`) ---

    def running(self) -> None:
        if not self.enabled:
            return
        config = self.runtime.config
        kinds: tuple[str, ...] = ("http-01", "tls-alpn-01") if config.listen.http else ("tls-alpn-01",)
        if config.listen.http is None and _TLSALPN01 is None:
            logger.warning("acme: listen.http is off and this acme library has no TLS-ALPN-01: "
                           "orders will fail unless another proxy forwards port 80")
        test_backoff = os.environ.get(TEST_BACKOFF_ENV)
        if test_backoff:
            self._backoff_min = float(test_backoff)
            logger.warning(f"acme: {TEST_BACKOFF_ENV}={test_backoff}: test-only backoff in effect")
        if not config.names.allow:
            logger.warning("acme: names.allow is empty, so a label may get a certificate ordered for any name "
                           "nobody else owns; on a shared server list your domains in names.allow")
        self.client = AcmeClient(config.acme, CertStorage(config.state_dir), self.tokens, kinds)
        self._kick = asyncio.Event()
        self._sem = asyncio.Semaphore(config.acme.concurrency)
        self._spawn(self._main())

    def done(self) -> None:
        for t in list(self._tasks):
            t.cancel()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a CA problem (those are handled per attempt): make it visible.
            logger.error("acme: internal error, certificates are no longer managed", exc_info=task.exception())

    # --- the loop -----------------------------------------------------------------------

    async def _main(self) -> None:
        assert self.client is not None
        stored = await asyncio.to_thread(self.client.storage.load_all)
        for name, cert in stored.items():
            st = self.states.setdefault(name, NameState(name))
            self._installed(st, cert)
        if stored:
            logger.info(f"acme: {len(stored)} stored certificates loaded")
        self._spawn(self._follow_snapshots())
        await self._schedule()

    async def _follow_snapshots(self) -> None:
        assert self._kick is not None
        while True:
            self._apply_snapshot()
            await self.runtime.changed(60.0)

    def _apply_snapshot(self) -> None:
        """The names to manage: those the snapshot says a group owns and wants a certificate for."""
        assert self._kick is not None
        wanted = self.runtime.snapshot.acme
        new = [n for n in wanted if n not in self.states or not self.states[n].container]
        for name, (container, group) in wanted.items():
            st = self.states.setdefault(name, NameState(name))
            st.container, st.group = container, group
        for name, st in self.states.items():
            if name not in wanted:
                st.container = ""  # keep serving what we have; stop renewing
        if new:
            logger.debug(f"acme: names wanted: {', '.join(new)}")
            self._kick.set()

    async def _schedule(self) -> None:
        assert self._kick is not None
        while True:
            now = time.time()
            wake_at = now + 3600.0
            for st in list(self.states.values()):
                if not st.container or st.busy or not self.runtime.manage:
                    continue  # (a debugging copy serves the stored certificates and orders nothing)
                due = max(st.due(now), self._order_allowed_at(st.group, now))
                if due <= now:
                    st.busy = True
                    self._orders.setdefault(st.group, []).append(now)
                    self._spawn(self._attempt(st))
                else:
                    wake_at = min(wake_at, due)
                if st.cert is not None and not st.failures and time.monotonic() - st.ari_checked > ARI_RECHECK:
                    st.ari_checked = time.monotonic()
                    self._spawn(self._check_ari(st))
            self._kick.clear()
            try:
                await asyncio.wait_for(self._kick.wait(), max(0.05, wake_at - time.time()))
            except TimeoutError:
                pass

    def _order_allowed_at(self, group: str, now: float) -> float:
        """When `group` may cause its next order: at most acme.max_orders_per_group per 24 hours,
        so one sandbox cannot spend the CA's rate limits that every other sandbox shares."""
        times = [t for t in self._orders.get(group, ()) if t > now - ORDER_WINDOW]
        self._orders[group] = times
        cap = self.runtime.config.acme.max_orders_per_group
        if len(times) < cap:
            self._capped.discard(group)
            return now
        if group not in self._capped:
            self._capped.add(group)
            logger.warning(f"acme: group '{group}' made {len(times)} orders in 24 h "
                           f"(acme.max_orders_per_group); its next order waits until "
                           f"{datetime.datetime.fromtimestamp(times[0] + ORDER_WINDOW, datetime.UTC):%Y-%m-%d %H:%M} UTC")
        return times[0] + ORDER_WINDOW

    async def _attempt(self, st: NameState) -> None:
        assert self.client is not None and self._sem is not None and self._kick is not None
        try:
            async with self._sem:
                st.phase = "ordering"
                what = "renewing" if st.cert is not None else "ordering"
                logger.info(f"acme: {st.name}: {what} a certificate (for container '{st.container}')")
                try:
                    issued = await asyncio.to_thread(self.client.issue, st.name)
                    path = await asyncio.to_thread(self.client.storage.save, st.name, issued.key_pem,
                                                   issued.fullchain_pem)
                    cert = await asyncio.to_thread(load_cert, path, None, "acme")
                except AcmeFailure as e:
                    self._failed(st, str(e), e.retry_after)
                    if e.account_gone:
                        self.client.forget_account()
                except Exception as e:  # noqa: BLE001 - one name's failure must not stop the others
                    self._failed(st, describe(e), None)
                else:
                    st.failures, st.last_error, st.next_attempt = 0, None, 0.0
                    self.orders["issued"] += 1
                    st.history.append(issued.seconds)
                    self._installed(st, cert)
                    n = issued.retries
                    retried = f", {n} request{'s' if n != 1 else ''} retried" if n else ""
                    logger.info(f"acme: {st.name}: certificate issued in {issued.seconds:.2f} s "
                                f"(serial {cert.serial:x}, valid until {cert.not_after:%Y-%m-%d %H:%M:%S} UTC, "
                                f"renewal at {st.renew_at:%Y-%m-%d %H:%M:%S} UTC{retried})")
        finally:
            st.busy = False
            self._kick.set()

    def _installed(self, st: NameState, cert: LoadedCert) -> None:
        st.cert = cert
        st.phase = "valid"
        st.renew_at = renewal_time(cert.not_before, cert.not_after)
        st.ari_checked = 0.0
        self.certificates.set_acme(st.name, cert)

    def _failed(self, st: NameState, message: str, retry_after: float | None) -> None:
        st.failures += 1
        self.orders["failed"] += 1
        delay = backoff_delay(st.failures, self._rng, self._backoff_min, max(BACKOFF_MAX, self._backoff_min))
        if retry_after is not None:
            delay = max(delay, retry_after)
        st.next_attempt = time.time() + delay
        st.last_error = message
        st.phase = "failed" if st.cert is None else "valid"
        keep = " (the current certificate stays in service)" if st.cert is not None else ""
        logger.warning(f"acme: {st.name}: attempt {st.failures} failed: {message}; "
                       f"next attempt in {format_duration(delay)}{keep}")

    async def _check_ari(self, st: NameState) -> None:
        assert self.client is not None and self._kick is not None
        cert = st.cert
        if cert is None:
            return
        try:
            window = await asyncio.to_thread(self.client.renewal_window, cert)
        except Exception as e:  # noqa: BLE001 - ARI is advice; our own schedule stands
            logger.debug(f"acme: {st.name}: renewalInfo unavailable: {describe(e)}")
            return
        if window and st.cert is cert and st.renew_at is not None:
            suggested = ari_pick(window, self._rng)
            if suggested < st.renew_at:
                st.renew_at = suggested
                logger.info(f"acme: {st.name}: the CA suggests renewal at {suggested:%Y-%m-%d %H:%M:%S} UTC")
                self._kick.set()

    # --- for `wakeproxy status` and tests ------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        """Per name: state, not_after, last_error, next_attempt (JSON-able)."""
        return {name: st.as_dict() for name, st in sorted(self.states.items())}

