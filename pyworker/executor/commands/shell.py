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
from collections.abc import Iterator
from typing import Any

from pyworker import marks, paths
from pyworker.executor.channel import Channel, CommandError
from pyworker.executor.commands.base import Command, NotRegularFile, open_regular
from pyworker.executor.process import (
    disown,
    kill_command,
    next_command_mark,
    reap_unowned,
    spawning,
    tree_rss,
)

#: The largest read of a command's output stream. A stream's reads start at
#: :data:`FIRST_READ_SIZE` and double each time one fills up: the I/O core's buffers follow
#: the output, so 64 commands that print a line each do not hold 64 x 2 x 256 KiB of them.
READ_SIZE = 256 * 1024
FIRST_READ_SIZE = 16 * 1024
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031
BACKUP_TIMEOUT = 5.0
LOGFILE_POLL_INTERVAL = 2.0
#: Most bytes read from one logfile per poll while the command runs, and per piece sent at
#: the end.
LOGFILE_READ_SIZE = 1024 * 1024
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
    """Follows one ``logfiles`` entry by polling, as the reference does (section 5.5).

    With ``beneath`` (``restrict_paths``) the file is stat'ed and opened through the policy
    each time: a path that leads outside the basedir then reads as "no file yet", and
    :attr:`refused` says why.

    Only a regular file is read (:func:`open_regular`): a FIFO, a device (a link to
    ``/dev/zero``) or a directory is not, and :attr:`not_read` says why. What is read is
    bounded: at most :data:`LOGFILE_READ_SIZE` bytes per poll while the command runs (the
    rest comes at the next poll), and at the end up to the size the file has then, in
    chunks that are sent one by one.
    """

    def __init__(self, name: str, path: str, follow: bool,
                 beneath: paths.Beneath | None = None) -> None:
        self.name = name
        self.path = path
        self.follow = follow
        self.beneath = beneath
        self.refused: str | None = None
        #: Why the file is not read (not a regular file); None while nothing was refused.
        self.not_read: str | None = None
        self.fd = -1
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.recorded = self._stat()

    def _stat(self) -> tuple[float, float, int] | None:
        try:
            if self.beneath is not None:
                fd = self.beneath.open(self.path, paths.O_PATH)
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
            else:
                st = os.stat(self.path)
        except paths.PathRefused as e:
            self.refused = str(e)
            return None
        except OSError:
            return None
        return (st.st_ctime, st.st_mtime, st.st_size)

    def _open(self) -> int:
        try:
            return open_regular(self.path, self.beneath)
        except paths.PathRefused as e:
            self.refused = str(e)
            raise OSError(str(e)) from None
        except NotRegularFile as e:
            self.not_read = str(e)
            raise

    def poll(self, final: bool = False) -> Iterator[str]:
        """The text that appeared since the last poll, in pieces (none if nothing new).

        ``final``: the command has ended; read up to the file's size now, however large."""
        if self.fd < 0:
            current = self._stat()
            if current is None:
                self.recorded = None
                return
            if current == self.recorded:
                return
            try:
                self.fd = self._open()
            except NotRegularFile:
                self.recorded = current  # tried again only once it changes
                return
            except OSError:
                return
            if self.follow:
                os.lseek(self.fd, current[2], os.SEEK_SET)
        if final:
            left = os.fstat(self.fd).st_size - os.lseek(self.fd, 0, os.SEEK_CUR)
        else:
            left = LOGFILE_READ_SIZE
        while left > 0:
            data = os.read(self.fd, min(left, LOGFILE_READ_SIZE))
            if not data:
                break
            left -= len(data)
            text = self.decoder.decode(data)
            if text:
                yield text

    def stop(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
        #: The logfiles whose :attr:`LogfileWatcher.not_read` the header reported.
        self.not_read_reported: set[str] = set()
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False
        self.line_count = 0
        #: This command's :mod:`pyworker.marks` mark: in its real environment, not in the
        #: header's (the master's log stays the reference's).
        self.mark = next_command_mark()

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
        if self.mark is not None:
            env[marks.MARK_VAR.encode()] = self.mark.encode()
        if self.use_pty:
            master, slave = pty.openpty()
            try:
                with spawning() as owned:
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
                    owned.add(self.proc.pid)
            finally:
                os.close(slave)
            os.set_blocking(master, False)
            return [(master, "stdout")], None
        with spawning() as owned:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.workdir,
                env=env,
                process_group=0,
            )
            owned.add(self.proc.pid)
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
            rc = self._pump(streams, stdin_fd, started)
        except BaseException:
            self.killed = True  # stopped by our own end (the front end gone): kill it all
            self._reap_leftovers()
            raise
        self._reap_leftovers()
        return rc

    def _pump(self, streams: list[tuple[int, str]], stdin_fd: int | None, started: float) -> int:
        """Watch the running child until it has exited and its output is read; report its rc.

        Each wake-up handles what the poll returned (:meth:`_RunState.dispatch`), then what
        is due (:meth:`_RunState.due`); :class:`_RunState` holds what is tracked in between.
        """
        assert self.proc is not None
        run = _RunState(self, self.proc, streams, stdin_fd)
        self.channel.on_interrupt = run.on_interrupt
        if self.channel.interrupt_reason is not None:
            run.on_interrupt()
        try:
            while not run.exited or run.open_fds:
                for fd, event in run.poller.poll(run.wait_ms()):
                    run.dispatch(fd, event)
                run.due(time.monotonic())
        finally:
            self.channel.on_interrupt = None
            run.close()
        return run.finish(started)

    def _sample_rss(self) -> None:
        """Add up the RSS of the command's process tree (for the resource report)."""
        assert self.proc is not None
        self.channel.peak_rss = max(self.channel.peak_rss, tree_rss(self.proc.pid))

    def _poll_logfiles(self, final: bool = False) -> bool:
        """Send what the watched logfiles gained (``final``: all they hold now, at the end);
        True if any had new text. A logfile found not to be a regular file is reported in
        the header, once."""
        active = False
        for w in self.watchers:
            for text in w.poll(final):
                active = True
                self.channel.log(w.name, text, force=True)
            if w.not_read is not None and w.name not in self.not_read_reported:
                self.not_read_reported.add(w.name)
                self._header(f"logfile '{w.name}' not read: {w.not_read}\n")
        return active

    def _wanted(self, key: str) -> bool:
        return self.send_stdout if key == "stdout" else self.send_stderr

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
        """After a kill, kill whatever the command left running (its group, and anywhere
        with its mark); always reap the orphans that have exited. Its own child is reaped
        (:meth:`_RunState.finish`) or, if the command is abandoned, given up."""
        assert self.proc is not None
        if self.killed:
            kill_command(self.proc.pid, self.mark)
        if self.proc.returncode is None:
            try:
                os.waitpid(self.proc.pid, os.WNOHANG)
            except ChildProcessError:
                pass
        disown(self.proc.pid)
        reap_unowned()


class _RunState:
    """One run of :meth:`ProcessRunner._pump`: the child's streams, stdin, pidfd and timers.

    Its steps, one per section below: **output** (a stream is readable: read it through its
    pump), **exit** (the pidfd fired), **stdin** (feed ``initial_stdin``), **deadlines**
    (``timeout``, ``maxTime``, ``max_lines`` and the kill sequence: ``sigtermTime``, then
    the interrupt signal, then giving up after :data:`BACKUP_TIMEOUT`) and **collect**
    (RSS samples, logfile polls, and at the end reaping the child and reporting its rc).
    """

    def __init__(self, runner: ProcessRunner, proc: subprocess.Popen[bytes],
                 streams: list[tuple[int, str]], stdin_fd: int | None) -> None:
        self.runner = runner
        self.proc = proc
        self.channel = runner.channel
        self.pidfd = os.pidfd_open(proc.pid)
        counting = runner.max_lines is not None
        self.pumps = {key: self.channel.pump(key, count_lines=counting) for _, key in streams}
        #: Output streams not at EOF yet: fd -> ``stdout`` / ``stderr``.
        self.open_fds = {fd: key for fd, key in streams}
        self.read_sizes = {fd: FIRST_READ_SIZE for fd, _ in streams}
        self.stdin_fd = stdin_fd
        self.stdin_view = memoryview(runner.stdin_data or b"") if stdin_fd is not None else None
        self.poller = select.poll()
        for fd in self.open_fds:
            self.poller.register(fd, select.POLLIN)
        self.poller.register(self.pidfd, select.POLLIN)
        self.poller.register(self.channel.rfd, select.POLLIN)
        if stdin_fd is not None:
            self.poller.register(stdin_fd, select.POLLOUT)

        now = time.monotonic()
        self.io_deadline = now + runner.timeout if runner.timeout else None
        self.max_deadline = now + runner.max_time if runner.max_time else None
        self.poll_deadline = now + LOGFILE_POLL_INTERVAL if runner.watchers else None
        self.sample_deadline = now + RSS_SAMPLE_INTERVAL
        self.sigterm_deadline: float | None = None
        self.backup_deadline: float | None = None
        self.exited = False

    def wait_ms(self) -> int | None:
        """How long the poll may sleep: until the next deadline (None: no deadline)."""
        deadlines = [
            d
            for d in (self.io_deadline, self.max_deadline, self.poll_deadline,
                      self.sigterm_deadline, self.backup_deadline, self.sample_deadline)
            if d is not None
        ]
        if not deadlines:
            return None
        return max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    def dispatch(self, fd: int, event: int) -> None:
        """Handle one poll event."""
        if fd in self.open_fds:
            self.on_output(fd)
        elif fd == self.pidfd:
            self.on_exit()
        elif fd == self.channel.rfd:
            self.channel.fill()  # an INTERRUPT calls on_interrupt
        elif fd == self.stdin_fd:
            self.on_stdin(event)

    def due(self, now: float) -> None:
        """What is due at ``now``, in this order: timeouts, collecting, the kill sequence."""
        self.check_timeouts(now)
        self.collect(now)
        self.escalate(now)

    # -- output ----------------------------------------------------------------------------

    def on_output(self, fd: int) -> None:
        """A stream is readable: pump one read; at EOF, end it; output restarts ``timeout``."""
        key = self.open_fds[fd]
        n = self.read(fd, key)
        if n < 0:
            return  # EAGAIN
        if n == 0:
            self.poller.unregister(fd)
            del self.open_fds[fd]
            if self.runner._wanted(key):
                self.pumps[key].eof()
            if self.runner.use_pty:
                os.close(fd)
            return
        self._restart_idle_timer(time.monotonic())

    def read(self, fd: int, key: str) -> int:
        """One read of a stream through its pump: bytes read, 0 at EOF, -1 if none ready.

        With ``max_lines`` the frame is held until the lines are counted: the chunk that
        crosses the limit reaches the master after the kill header, as the reference's.
        """
        runner = self.runner
        pump = self.pumps[key]
        size = self.read_sizes[fd]
        if not runner._wanted(key):
            n = pump.discard_from(fd, size)
        else:
            limit = None if runner.killed else runner.max_lines
            n = pump.read_from(fd, size, send=limit is None)
            if limit is not None and n > 0:
                self.check_max_lines(pump.last_newlines, limit)
                pump.send()
        if n == size and size < READ_SIZE:
            self.read_sizes[fd] = size * 2
        return n

    def close_streams(self) -> None:
        """Stop reading the output streams (after a kill or the exit, or when done)."""
        for fd in list(self.open_fds):
            self.poller.unregister(fd)
            del self.open_fds[fd]
            if self.runner.use_pty:
                os.close(fd)
        if not self.runner.use_pty:
            for f in (self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()

    # -- exit ------------------------------------------------------------------------------

    def on_exit(self) -> None:
        """The child exited. A PTY's output is read now: nobody else may hold the terminal,
        so there is no EOF to wait for."""
        self.poller.unregister(self.pidfd)
        self.exited = True
        if self.runner.use_pty:
            for pty_fd, key in list(self.open_fds.items()):
                try:
                    while self.read(pty_fd, key) > 0:
                        pass
                except OSError:
                    pass
            self.close_streams()

    def on_interrupt(self) -> None:
        """The master interrupted the command (``Channel.on_interrupt``)."""
        if not self.exited and not self.runner.killed:
            self.kill("command interrupted")

    # -- stdin -----------------------------------------------------------------------------

    def on_stdin(self, event: int) -> None:
        """The child's stdin takes more: write what is left, close it when done or broken."""
        assert self.stdin_fd is not None and self.stdin_view is not None
        try:
            n = os.write(self.stdin_fd, self.stdin_view)
        except BlockingIOError:
            return
        except BrokenPipeError:
            n = len(self.stdin_view)
        self.stdin_view = self.stdin_view[n:]
        if not self.stdin_view or event & (select.POLLERR | select.POLLHUP):
            self.poller.unregister(self.stdin_fd)
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.stdin_fd = None

    # -- deadlines -------------------------------------------------------------------------

    def _restart_idle_timer(self, now: float) -> None:
        """New output: ``timeout`` counts from ``now`` (unless killed: then it is off)."""
        timeout = self.runner.timeout
        if self.io_deadline is not None and timeout:
            self.io_deadline = now + timeout

    def check_timeouts(self, now: float) -> None:
        """``timeout`` (seconds without output) and ``maxTime`` (seconds in all)."""
        runner = self.runner
        if self.io_deadline is not None and now >= self.io_deadline:
            self.channel.update([("failure_reason", "timeout_without_output")], force=True)
            self.kill(
                f"command timed out: {runner.timeout} seconds without output "
                f"running {runner.fake}"
            )
        if self.max_deadline is not None and now >= self.max_deadline:
            self.channel.update([("failure_reason", "timeout")], force=True)
            self.kill(f"command timed out: {runner.max_time} seconds elapsed running {runner.fake}")

    def check_max_lines(self, newlines: int, limit: int) -> None:
        """Count the lines of the read just made (its frame still held): over ``limit``, kill."""
        runner = self.runner
        runner.line_count += newlines
        if runner.line_count > limit:
            self.channel.update([("failure_reason", "max_lines_failure")], force=True)
            self.kill(
                f"command exceeds max lines: {runner.line_count}/{limit} "
                f"written/allowed running {runner.fake}"
            )

    def kill(self, msg: str) -> None:
        """Start the kill sequence: SIGTERM first if ``sigtermTime``, else the interrupt
        signal at once (and stop reading: what is left of the output is dropped)."""
        runner = self.runner
        self.io_deadline = self.max_deadline = None
        runner._header("\n" + msg + ", attempting to kill\n")
        runner.killed = True
        if runner.sigterm_time is not None:
            runner._signal(signal.SIGTERM)
            self.sigterm_deadline = time.monotonic() + runner.sigterm_time
        else:
            runner._signal(_signal_number(runner.interrupt_signal))
            self.close_streams()
            self.backup_deadline = time.monotonic() + BACKUP_TIMEOUT

    def escalate(self, now: float) -> None:
        """``sigtermTime`` over: the interrupt signal. :data:`BACKUP_TIMEOUT` after that, a
        child still alive is given up on (fake rc -1, ``CommandError``)."""
        runner = self.runner
        if self.sigterm_deadline is not None and now >= self.sigterm_deadline:
            self.sigterm_deadline = None
            if _running(self.proc):
                runner._signal(_signal_number(runner.interrupt_signal))
            self.close_streams()
            self.backup_deadline = now + BACKUP_TIMEOUT
        if self.backup_deadline is not None and now >= self.backup_deadline:
            if _running(self.proc):
                name = "SIG" + runner.interrupt_signal
                runner._header(f"{name} failed to kill process\n")
                if runner.send_rc:
                    runner._header("using fake rc=-1\n")
                    self.channel.update([("rc", -1)], force=True)
                raise CommandError(f"{name} failed to kill process")
            self.backup_deadline = None
            self.exited = True
            self.close_streams()

    # -- collect ---------------------------------------------------------------------------

    def collect(self, now: float) -> None:
        """RSS samples and logfile polls when due; logfile text restarts ``timeout`` too."""
        if now >= self.sample_deadline:
            self.runner._sample_rss()
            self.sample_deadline = now + RSS_SAMPLE_INTERVAL
        if self.poll_deadline is not None and now >= self.poll_deadline:
            active = self.runner._poll_logfiles()
            self.poll_deadline = now + LOGFILE_POLL_INTERVAL
            if active:
                self._restart_idle_timer(now)

    def close(self) -> None:
        """However the loop ended: no child left running, nothing left open."""
        os.close(self.pidfd)
        if _running(self.proc):
            self.runner._signal(signal.SIGKILL)
        self.close_streams()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def finish(self, started: float) -> int:
        """Reap the child, send the last logfile text, its rc and ``elapsedTime``; return rc."""
        runner, proc, channel = self.runner, self.proc, self.channel
        if proc.returncode is None:
            # Reap it ourselves: wait4 also gives its peak RSS (and its waited-for children's).
            try:
                _, status, rusage = os.wait4(proc.pid, 0)
            except ChildProcessError:
                pass
            else:
                proc.returncode = os.waitstatus_to_exitcode(status)
                channel.peak_rss = max(channel.peak_rss, rusage.ru_maxrss * 1024)
                channel.children_cpu = (rusage.ru_utime, rusage.ru_stime)
        rc = proc.wait()
        elapsed = time.time() - started
        runner._poll_logfiles(final=True)
        for w in runner.watchers:
            w.stop()
        sig = -rc if rc < 0 else None
        if sig is not None or (runner.killed and rc == 0):
            rc = -1
        if runner.send_rc:
            if sig is not None:
                runner._header(f"process killed by signal {sig}\n")
            channel.update([("rc", rc)], force=True)
        runner._header(f"elapsedTime={elapsed:0.6f}\n")
        return rc


def _running(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has not exited, without reaping it (``Popen.poll`` would): its reaper
    is :meth:`_RunState.finish`, whose ``wait4`` gives the command's CPU time and peak RSS."""
    if proc.returncode is not None:
        return False
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


def _take_controlling_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class _PinnedWorkdirRunner(ProcessRunner):
    """A :class:`ProcessRunner` for ``restrict_paths``: the child starts in a directory the
    policy opened (``/proc/self/fd/N`` as its cwd, so the workdir's path is not resolved
    again), and logfiles are read through the policy. The master sees the workdir as it
    asked, and the child's ``PWD`` is that path too."""

    def __init__(self, channel: Channel, command: Any, workdir: str, workdir_fd: int,
                 beneath: paths.Beneath, logfiles: Any, **kwargs: Any) -> None:
        self.workdir_fd = workdir_fd
        super().__init__(channel, command, paths.proc_path(workdir_fd), logfiles=None,
                         **kwargs)
        self.workdir = workdir
        self.environ["PWD"] = os.path.abspath(workdir)
        if not isinstance(logfiles, dict):
            raise CommandError("'logfiles' must be a dictionary")
        self.logfiles = logfiles
        for name, value in logfiles.items():
            filename, follow = value, False
            if isinstance(value, dict):
                filename, follow = value.get("filename"), bool(value.get("follow", False))
            if not isinstance(filename, str):
                raise CommandError(f"logfile '{name}' needs a filename string")
            path = os.path.join(workdir, filename)
            try:  # refused now if it leads out already; it may not exist yet
                dir_fd, _ = beneath.locate(path)
            except OSError:
                pass
            else:
                os.close(dir_fd)
            self.watchers.append(LogfileWatcher(str(name), path, follow, beneath))

    def _spawn(self) -> tuple[list[tuple[int, str]], int | None]:
        shown, self.workdir = self.workdir, paths.proc_path(self.workdir_fd)
        try:
            return super()._spawn()
        finally:
            self.workdir = shown


class ShellCommand(Command):
    """``shell``: run a program or a shell string (PROTOCOL.md section 3.4)."""

    required_args = ("workdir", "command")

    def run(self) -> None:
        if self.beneath is None:
            ProcessRunner(self.channel, self.args["command"], self.arg_str("workdir"),
                          logfiles=self.args.get("logfiles") or {},
                          **self.runner_options()).run()
            return
        workdir = self.arg_str("workdir")
        try:
            workdir_fd = self.beneath.makedirs(workdir)
        except OSError as e:
            raise CommandError(f"cannot create workdir '{workdir}': {e.strerror}") from None
        try:
            runner = _PinnedWorkdirRunner(
                self.channel, self.args["command"], workdir, workdir_fd, self.beneath,
                self.args.get("logfiles") or {}, **self.runner_options())
            runner.run()
        finally:
            os.close(workdir_fd)
        refused = [f"logfile '{w.name}' not read: {w.refused}" for w in runner.watchers
                   if w.refused]
        if refused:  # a link out appeared while the command ran: the step fails
            raise CommandError("; ".join(refused))

    def runner_options(self) -> dict[str, Any]:
        """The :class:`ProcessRunner` options from the master's arguments."""
        args = self.args
        return dict(
            env=args.get("env"),
            send_stdout=self.arg_bool("want_stdout", True),
            send_stderr=self.arg_bool("want_stderr", True),
            send_rc=True,
            timeout=self.arg_number("timeout"),
            max_time=self.arg_number("maxTime"),
            max_lines=self.arg_number("max_lines"),
            sigterm_time=self.arg_number("sigtermTime"),
            initial_stdin=self.arg_str("initial_stdin", allow_none=True),
            log_environ=self.arg_bool("logEnviron", True),
            use_pty=args.get("usePTY", False),
            interrupt_signal=self.arg_str("interruptSignal", None, allow_none=True) or "KILL",
        )
