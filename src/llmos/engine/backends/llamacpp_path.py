"""Which llama.cpp CPU path this process runs, decided once per process before llama.cpp is loaded.

Contract: :func:`choose` returns the process's :class:`~llmos.machine.llamacpp_probe.Verdict` and applies
it (library directory, extra buffer types) the first time it is called; later calls return the same verdict. The
decision, in order of precedence:

1. ``LLMOS_LLAMACPP_EXTRA_BUFFERS`` set (``Settings.llamacpp_extra_buffers`` not None): as told, on the installed
   build, without probing;
2. a cached verdict for this machine and these builds (``<home>/probes`` or ``Settings.probe_cache_dir``);
3. a probe (:func:`llmos.machine.llamacpp_probe.cached_probe`): a child process checks the fast path
   of the installed build, then of each variant build in ``Settings.llamacpp_variants_dir``; the verdict is cached.

When the verdict is anything but the installed build's fast path, one line on stderr says which path runs and why,
once per process (``llmos doctor`` shows the details). Child processes inherit the library choice through
``LLAMA_CPP_LIB_PATH`` and read the same cached verdict.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

from llmos.config import Settings
from llmos.machine import llamacpp_probe as probe
from llmos.machine.llamacpp_probe import Verdict

log = logging.getLogger(__name__)

_lock = threading.Lock()
_chosen: Verdict | None = None
# llmos's own LLAMA_CPP_LIB_PATH choice, exported so that child processes can tell it from a user's setting
CHOSEN_LIB_VARIABLE = "LLMOS_LLAMACPP_CHOSEN_LIB"


def variants_root(settings: Settings) -> Path:
    """Where alternative llama.cpp builds live (the Makefile installs a no-AMX build there where AMX faults)."""
    return settings.llamacpp_variants_dir or Path(sys.prefix) / "lib" / "llmos-llama-cpp"


def cache_dir(settings: Settings) -> Path:
    return settings.probe_cache_dir or settings.home / "probes"


def user_lib_dir() -> Path | None:
    """A ``LLAMA_CPP_LIB_PATH`` the user set (not one llmos chose and passed down to this process)."""
    value = os.environ.get(probe.LIB_PATH_VARIABLE)
    if not value or value == os.environ.get(CHOSEN_LIB_VARIABLE):
        return None
    return Path(value)


def builds(settings: Settings) -> tuple[Path | None, list[Path]]:
    """(the build llama-cpp-python loads by default, the variant builds the probe may fall back to)."""
    user = user_lib_dir()
    if user is not None:
        return user, []  # the user chose the library: no variants
    return probe.installed_lib_dir(), probe.variant_dirs(variants_root(settings))


def decide(settings: Settings) -> Verdict:
    """The verdict for ``settings`` without applying it (explicit setting, cache, or a probe)."""
    if settings.llamacpp_extra_buffers is not None:
        value = "1" if settings.llamacpp_extra_buffers else "0"
        return Verdict(
            extra_buffers=settings.llamacpp_extra_buffers,
            lib_dir=None,
            build="installed",
            reason=f"LLMOS_LLAMACPP_EXTRA_BUFFERS={value} (set explicitly; not probed)",
            source="explicit",
        )
    native, variants = builds(settings)
    if native is None:
        return Verdict(False, None, "installed", "llama-cpp-python is not installed", source="explicit")
    return probe.cached_probe(
        cache_dir(settings),
        native,
        variants,
        timeout=settings.probe_timeout_seconds,
        on_probe=lambda: log.info("checking llama.cpp's fast CPU path on this machine (once per machine and build)"),
    )


def announce(verdict: Verdict) -> None:
    """The one line that says the fast path is not in use, and why."""
    if verdict.source == "explicit" or (verdict.extra_buffers and verdict.lib_dir is None):
        return
    line = (
        f"llmos: llama.cpp runs its {verdict.describe} path on this machine: {verdict.reason}."
        " (`llmos doctor` shows the details.)"
    )
    if logging.getLogger().handlers:  # a configured log (the server, job workers): the line goes there
        log.warning(line)
    else:  # the CLI and the SDK: stderr, where the user looks
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def choose(settings: Settings | None = None) -> Verdict:
    """Decide (once per process) and apply the llama.cpp path; returns the verdict."""
    global _chosen
    with _lock:
        if _chosen is not None:
            return _chosen
        verdict = decide(settings or Settings())
        if verdict.lib_dir is not None and "llama_cpp" in sys.modules:
            # too late to switch libraries in this process: the safe path of the loaded one is the safe choice
            verdict = Verdict(False, None, "installed", f"{verdict.reason}; llama_cpp was already imported", "")
        if user_lib_dir() is None and "llama_cpp" not in sys.modules:
            # a library choice inherited from an llmos parent process gives way to this process's verdict
            for name in (probe.LIB_PATH_VARIABLE, CHOSEN_LIB_VARIABLE):
                os.environ.pop(name, None)
            if verdict.lib_dir is not None:
                os.environ[probe.LIB_PATH_VARIABLE] = os.environ[CHOSEN_LIB_VARIABLE] = verdict.lib_dir
        probe.apply(verdict)
        announce(verdict)
        _chosen = verdict
        return verdict


def chosen() -> Verdict | None:
    """The verdict this process runs on, if llama.cpp has been set up yet."""
    return _chosen


def use_safe_path(reason: str) -> Verdict:
    """From now on, models this process loads run llama.cpp without extra buffer types (a model process restarted
    after the fast path faulted in its predecessor)."""
    global _chosen
    with _lock:
        previous = _chosen
        verdict = Verdict(False, None, "installed", reason, key=previous.key if previous else "", source="fault")
        if "llama_cpp" in sys.modules:
            probe.apply(verdict)
        _chosen = verdict
        return verdict


def record_fault(settings: Settings, reason: str) -> Verdict | None:
    """Remember that the fast path faulted on this machine, as its cached verdict: later processes run the safe
    path without probing, and ``llmos doctor`` shows ``reason``. None when llama-cpp-python is not installed."""
    native, variants = builds(settings)
    if native is None:
        return None
    key = probe.machine_key([native, *variants])
    verdict = Verdict(False, None, "installed", reason, key=key, source="fault", probed_at=time.time())
    probe.write_cached(cache_dir(settings), verdict)
    return verdict


def known(settings: Settings) -> Verdict | None:
    """The verdict without probing or applying anything: this process's, the explicit setting's or the cached one.

    ``None`` when this machine and build have not been probed yet (and llama-cpp-python is installed). For reports
    (``llmos show``, ``llmos bench``) that must not start a probe of their own.
    """
    if _chosen is not None:
        return _chosen
    native, variants = builds(settings)
    if settings.llamacpp_extra_buffers is not None or native is None:
        return decide(settings)  # neither of these probes
    return probe.read_cached(cache_dir(settings), probe.machine_key([native, *variants]))
