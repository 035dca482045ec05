"""The ``shell`` command and the process runner it shares with ``rmdir`` and ``cpdir``.

:class:`ProcessRunner` reproduces the reference's RunProcess as the master sees it (PROTOCOL.md
sections 3.4, 4 and 5): the same header lines, environment rules, timers, kill sequence,
``rc`` and ``elapsedTime``. It differs where the reference is slow or leaky: output is read in
large chunks and sent at once, each command runs in its own process group, and after a kill
every process the command left behind is killed too (the executor is a child subreaper, so
even daemonised grandchildren come back to it).
"""

from __future__ import annotations

import codecs
import fcntl
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import termios
import time
from typing import Any

from pyworker.executor.channel import Channel, CommandError
from pyworker.executor.commands.base import Command
from pyworker.executor.process import kill_descendants, reap_children

READ_SIZE = 256 * 1024
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031
BACKUP_TIMEOUT = 5.0
LOGFILE_POLL_INTERVAL = 2.0
LOGFILE_READ_SIZE = 10_000
RSS_SAMPLE_INTERVAL = 0.5
_ENV_SUBST = re.compile(r"\${([0-9a-zA-Z_]*)}")


def shell_quote(argv: list[bytes]) -> str:
    """The display form of a list command (reference ``shell_quote``)."""
    return " ".join(
        '""' if not a else shlex.quote(a.decode("utf-8", "replace")) for a in argv
    )


def build_environment(env: Any, workdir: str) -> dict[str, str]:
    """The child's environment from the ``env`` argument (PROTOCOL.md section 5.3)."""
    base = os.environ
    if not env:
        result = dict(base)
    else:
        if not isinstance(env, dict):
            raise CommandError(f"'env' must be a dictionary, not {type(env).__name__}")
        env = dict(env)
        for key, value in env.items():
            if isinstance(value, list | tuple):
                if not all(isinstance(v, str) for v in value):
                    raise CommandError(
                        f"'env' values must be strings or lists; key '{key}' is incorrect"
                    )
                env[key] = os.pathsep.join(value)
        if "PYTHONPATH" in env and isinstance(env["PYTHONPATH"], str):
            env["PYTHONPATH"] += os.pathsep + "${PYTHONPATH}"
        result = {k: v for k, v in base.items() if k not in env or env[k] is not None}
        for key, value in env.items():
            if value is None:
                continue
            if not isinstance(value, str) or not isinstance(key, str):
                raise CommandError(
                    f"'env' values must be strings or lists; key '{key}' is incorrect"
                )
            result[key] = _ENV_SUBST.sub(lambda m: base.get(m.group(1), ""), value)
    result["PWD"] = os.path.abspath(workdir)
    return result


def _to_bytes(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def split_command(command: Any) -> tuple[Any, Any]:
    """``(real, fake)`` encoded commands: ``bytes`` for a shell string, else a list of bytes."""
    if isinstance(command, str | bytes):
        encoded = _to_bytes(command)
        return encoded, encoded
    if not isinstance(command, list | tuple) or not command:
        raise CommandError(
            f"'command' must be a string or a non-empty list, not {type(command).__name__}"
        )
    real: list[bytes] = []
    fake: list[bytes] = []
    for word in command:
        if isinstance(word, list | tuple) and len(word) == 3 and word[0] == "obfuscated":
            real.append(_to_bytes(word[1]))
            fake.append(_to_bytes(word[2]))
        elif isinstance(word, str | bytes | int | float):
            real.append(_to_bytes(word))
            fake.append(_to_bytes(word))
        else:
            raise CommandError(f"'command' list items must be strings, not {word!r:.60}")
    return real, fake


def _signal_number(name: str) -> int:
    number = getattr(signal, "SIG" + name, None)
    if not isinstance(number, int):
        raise CommandError(f"unknown interruptSignal '{name}'")
    return number


class LogfileWatcher:
    """Follows one ``logfiles`` entry by polling, as the reference does (section 5.5)."""

    def __init__(self, name: str, path: str, follow: bool) -> None:
        self.name = name
        self.path = path
        self.follow = follow
        self.file: Any = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.recorded = self._stat()

    def _stat(self) -> tuple[float, float, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ctime, st.st_mtime, st.st_size)

    def poll(self) -> str:
        """Text that appeared since the last poll ('' if none)."""
        if self.file is None:
            current = self._stat()
            if current is None:
                self.recorded = None
                return ""
            if current == self.recorded:
                return ""
            try:
                self.file = open(self.path, "rb")  # noqa: SIM115 - closed in stop()
            except OSError:
                return ""
            if self.follow:
                self.file.seek(current[2])
        chunks = []
        while True:
            data = self.file.read(LOGFILE_READ_SIZE)
            if not data:
                break
            chunks.append(self.decoder.decode(data))
        return "".join(chunks)

    def stop(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class ProcessRunner:
    """Runs one child process the way the reference's RunProcess does."""

    def __init__(
        self,
        channel: Channel,
        command: Any,
        workdir: str,
        *,
        env: Any = None,
        send_stdout: bool = True,
        send_stderr: bool = True,
        send_rc: bool = True,
        timeout: float | None = None,
        max_time: float | None = None,
        max_lines: int | None = None,
        sigterm_time: float | None = None,
        initial_stdin: str | None = None,
        log_environ: bool = True,
        logfiles: Any = None,
        use_pty: Any = False,
        interrupt_signal: str = "KILL",
    ) -> None:
        self.channel = channel
        self.real, self.fake = split_command(command)
        self.workdir = workdir
        self.send_stdout = send_stdout
        self.send_stderr = send_stderr
        self.send_rc = send_rc
        self.timeout = timeout
        self.max_time = max_time
        self.max_lines = max_lines
        self.sigterm_time = sigterm_time
        self.interrupt_signal = interrupt_signal
        self.log_environ = log_environ
        self.logfiles = logfiles if logfiles is not None else {}
        if not isinstance(self.logfiles, dict):
            raise CommandError("'logfiles' must be a dictionary")
        self.stdin_data = _to_bytes(initial_stdin) if initial_stdin is not None else None
        if use_pty not in (True, False):
            raise CommandError(f"Unexpected usePTY argument value: {use_pty!r}. Expected boolean.")
        self.use_pty = bool(use_pty)
        if initial_stdin is not None and self.use_pty:
            self._header("WARNING: disabling usePTY for this command")
            self.use_pty = False
        _signal_number(interrupt_signal)
        if not os.path.isdir(workdir):
            try:
                os.makedirs(workdir)
            except OSError as e:
                raise CommandError(f"cannot create workdir '{workdir}': {e.strerror}") from None
        self.environ = build_environment(env, workdir)
        self.watchers = []
        for name, value in self.logfiles.items():
            filename, follow = value, False
            if isinstance(value, dict):
                filename, follow = value.get("filename"), bool(value.get("follow", False))
            if not isinstance(filename, str):
                raise CommandError(f"logfile '{name}' needs a filename string")
            self.watchers.append(LogfileWatcher(str(name), os.path.join(workdir, filename), follow))
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False
        self.line_count = 0

    # -- output --------------------------------------------------------------------------

    def _header(self, text: str) -> None:
        self.channel.text("header", text, force=True)

    def _headers(self) -> None:
        if isinstance(self.fake, bytes):
            display = self.fake.decode("utf-8", "replace")
        else:
            display = shell_quote(self.fake)
        self._header(display + "\n")
        msg = f" in dir {self.workdir}"
        if self.timeout:
            msg += f" (timeout {self.timeout} {'sec' if self.timeout == 1 else 'secs'})"
        if self.max_time:
            msg += f" (maxTime {self.max_time} {'sec' if self.max_time == 1 else 'secs'})"
        self._header(msg + "\n")
        self._header(f" watching logfiles {self.logfiles}\n")
        self._header(f" argv: {self.fake}\n")
        if self.log_environ:
            lines = [" environment:\n"]
            lines.extend(f"  {k}={self.environ[k]}\n" for k in sorted(self.environ))
            self._header("".join(lines))
        if self.stdin_data:
            self._header(f" writing {len(self.stdin_data)} bytes to stdin\n")
        self._header(f" using PTY: {self.use_pty}\n")

    # -- running -------------------------------------------------------------------------

    def _spawn(self) -> tuple[list[tuple[int, str]], int | None]:
        argv = [b"/bin/sh", b"-c", self.real] if isinstance(self.real, bytes) else self.real
        env = {k.encode(): v.encode("utf-8", "surrogateescape") for k, v in self.environ.items()}
        if self.use_pty:
            master, slave = pty.openpty()
            try:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=self.workdir,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_take_controlling_tty,
                )
            finally:
                os.close(slave)
            os.set_blocking(master, False)
            return [(master, "stdout")], None
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.workdir,
            env=env,
            process_group=0,
        )
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        streams = [(self.proc.stdout.fileno(), "stdout"), (self.proc.stderr.fileno(), "stderr")]
        for fd, _ in streams:
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass
        if not self.stdin_data:
            self.proc.stdin.close()
            return streams, None
        stdin_fd = self.proc.stdin.fileno()
        os.set_blocking(stdin_fd, False)
        return streams, stdin_fd

    def run(self) -> int:
        """Run the process to its end; return its rc. Raises CommandError if it would not die."""
        self._headers()
        started = time.time()
        try:
            streams, stdin_fd = self._spawn()
        except OSError as e:
            # The reference's child fails after fork; the master sees rc 1 and the reason.
            self.channel.text("stderr", f"error: cannot run {self.fake!r}: {e}\n", force=True)
            if self.send_rc:
                self.channel.update([("rc", 1)], force=True)
            self._header(f"elapsedTime={time.time() - started:0.6f}\n")
            return 1
        try:
            return self._pump(streams, stdin_fd, started)
        finally:
            self._reap_leftovers()

    def _pump(self, streams: list[tuple[int, str]], stdin_fd: int | None, started: float) -> int:
        proc = self.proc
        assert proc is not None
        channel = self.channel
        pidfd = os.pidfd_open(proc.pid)
        counting = self.max_lines is not None
        pumps = {key: channel.pump(key, count_lines=counting) for _, key in streams}
        open_fds = {fd: key for fd, key in streams}
        stdin_view = memoryview(self.stdin_data or b"") if stdin_fd is not None else None
        poller = select.poll()
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        poller.register(channel.rfd, select.POLLIN)
        if stdin_fd is not None:
            poller.register(stdin_fd, select.POLLOUT)

        now = time.monotonic()
        io_deadline = now + self.timeout if self.timeout else None
        max_deadline = now + self.max_time if self.max_time else None
        poll_deadline = now + LOGFILE_POLL_INTERVAL if self.watchers else None
        sample_deadline = now + RSS_SAMPLE_INTERVAL
        self._sigterm_deadline: float | None = None
        self._backup_deadline: float | None = None
        exited = False

        def close_streams() -> None:
            for fd in list(open_fds):
                poller.unregister(fd)
                del open_fds[fd]
                if self.use_pty:
                    os.close(fd)
            if self.proc is not None and not self.use_pty:
                for f in (self.proc.stdout, self.proc.stderr):
                    if f is not None:
                        f.close()

        def kill(msg: str) -> None:
            nonlocal io_deadline, max_deadline
            io_deadline = max_deadline = None
            self._header("\n" + msg + ", attempting to kill\n")
            self.killed = True
            if self.sigterm_time is not None:
                self._signal(signal.SIGTERM)
                self._sigterm_deadline = time.monotonic() + self.sigterm_time
            else:
                self._signal(_signal_number(self.interrupt_signal))
                close_streams()
                self._backup_deadline = time.monotonic() + BACKUP_TIMEOUT

        def on_interrupt() -> None:
            if not exited and not self.killed:
                kill("command interrupted")

        channel.on_interrupt = on_interrupt
        if channel.interrupt_reason is not None:
            on_interrupt()

        try:
            while not exited or open_fds:
                deadlines = [
                    d
                    for d in (io_deadline, max_deadline, poll_deadline, self._sigterm_deadline,
                              self._backup_deadline, sample_deadline)
                    if d is not None
                ]
                wait_ms = None
                if deadlines:
                    wait_ms = max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)
                events = poller.poll(wait_ms)
                for fd, event in events:
                    if fd in open_fds:
                        key = open_fds[fd]
                        n = self._read(pumps[key], fd, key, kill)
                        if n < 0:
                            continue  # EAGAIN
                        if n == 0:
                            poller.unregister(fd)
                            del open_fds[fd]
                            if self._wanted(key):
                                pumps[key].eof()
                            if self.use_pty:
                                os.close(fd)
                            continue
                        if io_deadline is not None:
                            io_deadline = time.monotonic() + self.timeout  # type: ignore[operator]
                    elif fd == pidfd:
                        poller.unregister(pidfd)
                        exited = True
                        if self.use_pty:
                            # Nobody else may hold the terminal: do not wait for an EOF.
                            for pty_fd, key in list(open_fds.items()):
                                try:
                                    while self._read(pumps[key], pty_fd, key, kill) > 0:
                                        pass
                                except OSError:
                                    pass
                            close_streams()
                    elif fd == channel.rfd:
                        channel.fill()
                    elif fd == stdin_fd:
                        assert stdin_view is not None
                        try:
                            n = os.write(stdin_fd, stdin_view)
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            n = len(stdin_view)
                        stdin_view = stdin_view[n:]
                        if not stdin_view or event & (select.POLLERR | select.POLLHUP):
                            poller.unregister(stdin_fd)
                            assert proc.stdin is not None
                            proc.stdin.close()
                            stdin_fd = None
                now = time.monotonic()
                if io_deadline is not None and now >= io_deadline:
                    channel.update([("failure_reason", "timeout_without_output")], force=True)
                    kill(
                        f"command timed out: {self.timeout} seconds without output "
                        f"running {self.fake}"
                    )
                if max_deadline is not None and now >= max_deadline:
                    channel.update([("failure_reason", "timeout")], force=True)
                    kill(f"command timed out: {self.max_time} seconds elapsed running {self.fake}")
                if now >= sample_deadline:
                    self._sample_rss()
                    sample_deadline = now + RSS_SAMPLE_INTERVAL
                if poll_deadline is not None and now >= poll_deadline:
                    self._poll_logfiles()
                    poll_deadline = now + LOGFILE_POLL_INTERVAL
                    if io_deadline is not None and self._logfile_activity:
                        io_deadline = now + self.timeout  # type: ignore[operator]
                if self._sigterm_deadline is not None and now >= self._sigterm_deadline:
                    self._sigterm_deadline = None
                    if proc.poll() is None:
                        self._signal(_signal_number(self.interrupt_signal))
                    close_streams()
                    self._backup_deadline = now + BACKUP_TIMEOUT
                if self._backup_deadline is not None and now >= self._backup_deadline:
                    if proc.poll() is None:
                        name = "SIG" + self.interrupt_signal
                        self._header(f"{name} failed to kill process\n")
                        if self.send_rc:
                            self._header("using fake rc=-1\n")
                            channel.update([("rc", -1)], force=True)
                        raise CommandError(f"{name} failed to kill process")
                    self._backup_deadline = None
                    exited = True
                    close_streams()
        finally:
            channel.on_interrupt = None
            os.close(pidfd)
            if proc.poll() is None:
                self._signal(signal.SIGKILL)
            close_streams()
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()

        if proc.returncode is None:
            # Reap it ourselves: wait4 also gives its peak RSS (and its waited-for children's).
            try:
                _, status, rusage = os.wait4(proc.pid, 0)
            except ChildProcessError:
                pass
            else:
                proc.returncode = os.waitstatus_to_exitcode(status)
                channel.peak_rss = max(channel.peak_rss, rusage.ru_maxrss * 1024)
        rc = proc.wait()
        elapsed = time.time() - started
        self._poll_logfiles()
        for w in self.watchers:
            w.stop()
        sig = -rc if rc < 0 else None
        if sig is not None or (self.killed and rc == 0):
            rc = -1
        if self.send_rc:
            if sig is not None:
                self._header(f"process killed by signal {sig}\n")
            channel.update([("rc", rc)], force=True)
        self._header(f"elapsedTime={elapsed:0.6f}\n")
        return rc

    _logfile_activity = False

    def _sample_rss(self) -> None:
        """Add up the RSS of the command's process tree (for the resource report)."""
        import psutil

        assert self.proc is not None
        try:
            top = psutil.Process(self.proc.pid)
            procs = [top, *top.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.channel.peak_rss = max(self.channel.peak_rss, total)

    def _poll_logfiles(self) -> None:
        self._logfile_activity = False
        for w in self.watchers:
            text = w.poll()
            if text:
                self._logfile_activity = True
                self.channel.log(w.name, text, force=True)

    def _wanted(self, key: str) -> bool:
        return self.send_stdout if key == "stdout" else self.send_stderr

    def _read(self, pump: Any, fd: int, key: str, kill: Any) -> int:
        """One read of a stream through its pump: bytes read, 0 at EOF, -1 if none ready.

        With ``max_lines`` the frame is held until the lines are counted: the chunk that
        crosses the limit reaches the master after the kill header, as the reference's.
        """
        if not self._wanted(key):
            return int(pump.discard_from(fd, READ_SIZE))
        counting = self.max_lines is not None and not self.killed
        n = int(pump.read_from(fd, READ_SIZE, send=not counting))
        if counting and n > 0:
            self.line_count += pump.last_newlines
            if self.line_count > self.max_lines:  # type: ignore[operator]
                self.channel.update([("failure_reason", "max_lines_failure")], force=True)
                kill(
                    f"command exceeds max lines: {self.line_count}/{self.max_lines} "
                    f"written/allowed running {self.fake}"
                )
            pump.send()
        return n

    def _signal(self, signum: int) -> None:
        """Signal the command's process group (its pgid is its pid), else the process."""
        proc = self.proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            if proc.returncode is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _reap_leftovers(self) -> None:
        """After a kill, kill whatever the command left running; always reap zombies."""
        if self.killed:
            kill_descendants()
        reap_children()


def _take_controlling_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class ShellCommand(Command):
    """``shell``: run a program or a shell string (PROTOCOL.md section 3.4)."""

    required_args = ("workdir", "command")

    def run(self) -> None:
        args = self.args
        runner = ProcessRunner(
            self.channel,
            args["command"],
            self.arg_str("workdir"),
            env=args.get("env"),
            send_stdout=self.arg_bool("want_stdout", True),
            send_stderr=self.arg_bool("want_stderr", True),
            send_rc=True,
            timeout=self.arg_number("timeout"),
            max_time=self.arg_number("maxTime"),
            max_lines=self.arg_number("max_lines"),  # type: ignore[arg-type]
            sigterm_time=self.arg_number("sigtermTime"),
            initial_stdin=self.arg_str("initial_stdin", allow_none=True),
            log_environ=self.arg_bool("logEnviron", True),
            logfiles=args.get("logfiles") or {},
            use_pty=args.get("usePTY", False),
            interrupt_signal=self.arg_str("interruptSignal", None, allow_none=True) or "KILL",
        )
        runner.run()
