#!/usr/bin/env python3
"""Side-by-side benchmark of SMTP relays on one machine, all on loopback.

    smtp-source --> [relay under test] --> smtp-sink

Systems:  direct (no relay: the physical limit), postfix (store-and-forward,
          private instance), aiosmtpd (stock Proxy handler), haraka
          (queue/smtp_forward, inline; optional), relay (any command given as
          RELAY_CMD / --relay-cmd; benchmarks/run.sh runs smtprelay).
Workloads: i (2000 x 1 KB, 10 sessions), ii (200 x 1 MB, 5 sessions),
          iii (1 x 50 MB), iv (20 sessions one after another, 1 x 1 KB each,
          per-message latency p50/p95), ivp (20 parallel sessions x 1 x 1 KB),
          v (500 concurrent idle sessions: RSS, and does it still serve);
          on request: vi (i with a TLS downstream), vii-10 / vii-1 (TLS both
          sides, sessions of ~10 / 1 messages), viii (i against two relay
          processes on one port too), lmtp-dovecot (LMTP to a real Dovecot).

The relay row is checked against the performance targets (PASS/FAIL).
Exit status: 0 all ok; 1 a run failed (e.g. a message did not reach the
sink); 3 every run ok but a target was missed.

Every server is started here and stopped here by its PID; every load is
bounded in count and time. Python standard library only. See README.md.
"""

import argparse
import errno
import json
import math
import os
import re
import resource
import selectors
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import tempfile
import sys
import threading
import time

import pyspy
from tls import Stunnel, make_pki, wait_listening

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, 'peers')
HARAKA_BIN = os.path.join(PEERS, 'npm', 'node_modules', 'Haraka', 'bin', 'haraka')
AIOSMTPD_PY = os.path.join(PEERS, 'venv', 'bin', 'python')
WORK_BASE = os.environ.get('SMTPBENCH_WORK', os.path.join(tempfile.gettempdir(), 'smtpbench'))
HOST = '127.0.0.1'
SENDER = 'sender@bench.test'
RCPT = 'rcpt@bench.test'
HELO = 'bench.test'
CLK_TCK = os.sysconf('SC_CLK_TCK')
WRAPPERS = {'sh', 'dash', 'bash', 'timeout', 'env', 'time'}

KB = 1024
MB = 1024 * 1024
WORKLOADS = {
    # name: messages, payload bytes, parallel sessions, reuse connection (-d),
    #       time limit for the whole measurement (load + drain), seconds
    'i':   dict(desc='2000 x 1 KB, 10 parallel sessions', kind='source',
                msgs=2000, size=KB, sessions=10, reuse=True, limit=120),
    'ii':  dict(desc='200 x 1 MB, 5 parallel sessions', kind='source',
                msgs=200, size=MB, sessions=5, reuse=True, limit=120),
    'iii': dict(desc='1 x 50 MB', kind='source',
                msgs=1, size=50 * MB, sessions=1, reuse=False, limit=120),
    'iv':  dict(desc='20 sessions one after another, 1 x 1 KB each (latency)',
                kind='latency', msgs=20, size=KB, sessions=1, reuse=False,
                limit=60),
    'ivp': dict(desc='20 parallel sessions, 1 x 1 KB each', kind='source',
                msgs=20, size=KB, sessions=20, reuse=False, limit=60),
    # 500 client sessions open, greeted and EHLO'd, then held idle for
    # `hold` seconds; memory at that plateau; then 1 message (the probe)
    # goes through while they are all still open
    'v':   dict(desc='500 concurrent idle sessions (RSS, still serving)',
                kind='idle', msgs=1, size=KB, sessions=500, reuse=False,
                hold=5, open_limit=30, limit=90),
    # i with the relay -> sink hop over implicit TLS (stunnel in front of
    # smtp-sink); Postfix also with smtp_tls_connection_reuse (its best)
    'vi':  dict(desc='i with a TLS downstream', kind='source',
                msgs=2000, size=KB, sessions=10, reuse=True, limit=120,
                tls_down=True, extra_systems=['postfix-reuse']),
    # vi, and smtp-source reaches each system's implicit-TLS listener
    # through an stunnel client: sessions of 10 messages (20 rounds of
    # smtp-source -s 10 -m 100 -d) and of 1 message (a handshake each)
    'vii-10': dict(desc='TLS both sides, sessions of ~10 messages',
                   kind='source', msgs=2000, size=KB, sessions=10, reuse=True,
                   rounds=20, limit=120, tls_down=True, tls_up=True,
                   extra_systems=['postfix-reuse']),
    'vii-1': dict(desc='TLS both sides, sessions of 1 message',
                  kind='source', msgs=1000, size=KB, sessions=10, reuse=False,
                  limit=120, tls_down=True, tls_up=True,
                  extra_systems=['postfix-reuse']),
    # i against two relay processes on one port (reuse_port) as well
    'viii': dict(desc='i, also against two relay processes on one port',
                 kind='source', msgs=2000, size=KB, sessions=10, reuse=True,
                 limit=120, extra_systems=['relay-x2']),
    # an SMTP listener in front of a real Dovecot LMTP server (1 recipient
    # per message); Postfix with its lmtp client (default_transport)
    'lmtp-dovecot': dict(desc='1000 x 1 KB, 10 sessions, LMTP to Dovecot',
                         kind='source', msgs=1000, size=KB, sessions=10,
                         reuse=True, limit=120, dovecot=True),
}
ALIASES = {'vii': ['vii-10', 'vii-1']}
DEFAULT_WORKLOADS = ['i', 'ii', 'iii', 'iv', 'ivp', 'v']
SYSTEMS = ['direct', 'postfix', 'haraka', 'aiosmtpd', 'relay']
DEFAULT_SYSTEMS = ['direct', 'postfix', 'aiosmtpd']   # haraka: opt-in (npm)

# The performance targets for one relay process (the "relay" system's rows)
TARGETS = {
    'i':   'msg/s >= 1.5x postfix and >= 1.3x aiosmtpd',
    'ii':  'msg/s >= 1.0x postfix',
    'iii': 'peak RSS <= 40 MB; growth over idle <= 1 MB',
    'iv':  'p50 <= direct + 1 ms',
    'v':   'RSS <= 150 MB with 500 idle sessions, and still serving',
    'vi':  'msg/s >= 3.5x postfix-reuse; >= 0.8x its own i (TLS costs <= 20%)',
    'vii-10': 'msg/s >= 2x postfix',
    'vii-1': 'msg/s >= 1.2x postfix',
    'viii': 'two processes: msg/s >= 1.6x one process and >= 6x postfix',
}


def log(msg):
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


class Skip(Exception):
    """This system cannot run this combination (reported, not a failure)."""


# ---------------------------------------------------------------- /proc ----

def proc_stat(pid):
    """(state, ppid, utime+stime ticks, starttime) or None if gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(')') + 2:].split()
    # rest[0]=state(3) rest[1]=ppid(4) rest[11]=utime(14) rest[12]=stime(15)
    # rest[19]=starttime(22)
    return rest[0], int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19])


def alive(pid, starttime=None):
    st = proc_stat(pid)
    if st is None or st[0] in ('Z', 'X'):
        return False
    return starttime is None or st[3] == starttime


def proc_status(pid):
    out = {}
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                k, _, v = line.partition(':')
                if k in ('Name', 'VmRSS', 'VmHWM'):
                    out[k] = v.strip()
    except OSError:
        return None
    return out


def kb(v):
    return int(v.split()[0]) if v else 0


def pss_kb(pid):
    try:
        with open(f'/proc/{pid}/smaps_rollup') as f:
            for line in f:
                if line.startswith('Pss:'):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid):
    kids = []
    try:
        for tid in os.listdir(f'/proc/{pid}/task'):
            try:
                with open(f'/proc/{pid}/task/{tid}/children') as f:
                    kids.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return kids


def tree(roots):
    seen, todo = [], list(roots)
    while todo:
        p = todo.pop()
        if p in seen or not alive(p):
            continue
        seen.append(p)
        todo.extend(children(p))
    return seen


def cpu_busy():
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def background_busy(seconds=1.0):
    """Share of the whole box (all cores) busy while nothing of ours runs."""
    b0 = cpu_busy()
    time.sleep(seconds)
    b1 = cpu_busy()
    return 100 * (b1[0] - b0[0]) / max(1, b1[1] - b0[1])


def self_cpu():
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def udp_out():
    with open('/proc/net/snmp') as f:
        lines = [l.split() for l in f if l.startswith('Udp:')]
    hdr, val = lines[0], lines[1]
    return int(val[hdr.index('OutDatagrams')])


# ------------------------------------------------------ process registry ----

class Registry:
    """Every process this run starts, so that it can be stopped by PID even
    after a crash (pids.json in the run's work dir is read by later runs)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.entries = []
        self.path = os.path.join(run_dir, 'pids.json')

    def add(self, pid, kind, cmd, conf=None):
        st = proc_stat(pid)
        e = dict(pid=pid, kind=kind, cmd=cmd, conf=conf,
                 starttime=st[3] if st else None)
        self.entries.append(e)
        self._save()
        return e

    def remove(self, e):
        if e in self.entries:
            self.entries.remove(e)
            self._save()

    def _save(self):
        with open(self.path + '.tmp', 'w') as f:
            json.dump(self.entries, f)
        os.replace(self.path + '.tmp', self.path)

    def stop_all(self):
        for e in list(reversed(self.entries)):
            stop_entry(e)
            self.remove(e)


def stop_entry(e, grace=5.0):
    pid, st0 = e['pid'], e.get('starttime')
    if not alive(pid, st0):
        return
    if e['kind'] == 'postfix' and e.get('conf'):
        try:
            subprocess.run(['postfix', '-c', e['conf'], 'stop'], timeout=30,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            pass
        end = time.monotonic() + 15
        while alive(pid, st0) and time.monotonic() < end:
            time.sleep(0.1)
        if alive(pid, st0):  # master did not go: kill it and what it forked
            for p in tree([pid]):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        return
    group = e['kind'] == 'pgroup'
    sig_send(pid, signal.SIGTERM, group)
    end = time.monotonic() + grace
    while alive(pid, st0) and time.monotonic() < end:
        reap(pid)
        time.sleep(0.05)
    if alive(pid, st0) or group:
        sig_send(pid, signal.SIGKILL, group)
    end = time.monotonic() + 5
    while alive(pid, st0) and time.monotonic() < end:
        reap(pid)
        time.sleep(0.05)
    reap(pid)


def sig_send(pid, sig, group):
    try:
        if group:
            os.killpg(pid, sig)  # the session/group this harness created
        else:
            os.kill(pid, sig)
    except OSError:
        pass


def reap(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def cleanup_leftovers():
    """Stop servers left by an earlier run of this harness that died."""
    if not os.path.isdir(WORK_BASE):
        return
    for name in sorted(os.listdir(WORK_BASE)):
        d = os.path.join(WORK_BASE, name)
        p = os.path.join(d, 'pids.json')
        if not os.path.isfile(p):
            continue
        owner = re.match(r'run-\d+-\d+-(\d+)$', name)
        if owner and alive(int(owner.group(1))):
            continue  # another harness run is live: leave it alone
        try:
            with open(p) as f:
                entries = json.load(f)
        except (OSError, ValueError):
            entries = []
        for e in entries:
            if alive(e['pid'], e.get('starttime')):
                log(f'stopping leftover {e["kind"]} pid {e["pid"]} from {name}')
                stop_entry(e)
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------- helpers ----

def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_banner(port, deadline, proc_alive=lambda: True):
    last = None
    while time.monotonic() < deadline:
        if not proc_alive():
            raise BenchError(f'server for port {port} exited during start')
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                s.settimeout(5)
                data = s.recv(512)
                if data.startswith(b'220'):
                    try:
                        s.sendall(b'QUIT\r\n')
                        s.recv(512)
                    except OSError:
                        pass
                    return
                last = data
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise BenchError(f'no 220 banner on port {port}: {last!r}')


def render(text, values):
    for k, v in values.items():
        text = text.replace('{' + k + '}', str(v))
    return text


def make_message(size, n=0):
    hdr = (f'From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: bench {n}\r\n'
           f'Message-Id: <bench.{os.getpid()}.{n}.{time.time_ns()}@{HELO}>\r\n'
           f'Date: {time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())}'
           '\r\n\r\n')
    body, left = [], size
    i = 0
    while left > 0:
        i += 1
        line = (str(i % 10) + 'X' * 77)[:max(1, min(78, left - 2))]
        body.append(line + '\r\n')
        left -= len(line) + 2
    return hdr + ''.join(body)


# ---------------------------------------------------------------- sink ----

class Counted:
    """A sink's count of messages received: self.count, self.events
    [(perf_counter, count)] at each change, under self.cond; running()
    says whether the sink is still up."""

    def wait_count(self, n, deadline):
        with self.cond:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0 or not self.running():
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def time_reached(self, n):
        with self.cond:
            for t, c in self.events:
                if c >= n:
                    return t
        return None


class Sink(Counted):
    """smtp-sink with its -c counters read live (the pipe must be drained,
    or smtp-sink blocks once 64 KB of counters are unread)."""

    COUNT = re.compile(rb'mesg=(\d+)')

    def __init__(self, port, lmtp, reg, run_dir):
        self.port, self.lmtp, self.reg = port, lmtp, reg
        cmd = ['smtp-sink', '-c']
        if os.geteuid() == 0:
            cmd += ['-u', 'nobody']
        if lmtp:
            cmd.append('-L')
        cmd += [f'{HOST}:{port}', '1000']
        self.err = open(os.path.join(run_dir, f'sink-{port}.err'), 'wb')
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=self.err, stdin=subprocess.DEVNULL)
        self.entry = reg.add(self.proc.pid, 'popen', cmd)
        self.count = 0
        self.events = []          # (perf_counter, mesg) at each change
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            wait_banner(port, time.monotonic() + 15,
                        lambda: self.proc.poll() is None)
        except BenchError:
            self.stop()
            raise

    def _read(self):
        fd = self.proc.stdout.fileno()
        buf = b''
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            now = time.perf_counter()
            buf += chunk
            *records, buf = buf.split(b'\r')
            if not records:
                continue
            m = self.COUNT.search(records[-1])
            if m:
                n = int(m.group(1))
                with self.cond:
                    if n != self.count:
                        self.count = n
                        self.events.append((now, n))
                        self.cond.notify_all()

    def running(self):
        return self.proc.poll() is None

    def cpu_ticks(self):
        st = proc_stat(self.proc.pid)
        return st[2] if st else 0

    def stop(self):
        stop_entry(self.entry)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.reg.remove(self.entry)
        self.err.close()


class DovecotSink(Counted):
    """A real Dovecot LMTP server (tests/dovecot-lmtp.sh: a private
    instance, Maildir) as the sink, with the same interface as Sink: the
    messages are counted as files in the recipient's Maildir/new, polled
    every 20 ms (the end time is late by up to that)."""

    SCRIPT = os.path.join(os.path.dirname(HERE), 'tests', 'dovecot-lmtp.sh')
    POLL = 0.02

    def __init__(self, port, reg, run_dir):
        if not shutil.which('dovecot') or not os.path.exists(self.SCRIPT):
            raise Skip('dovecot (or tests/dovecot-lmtp.sh) not installed')
        self.port, self.reg = port, reg
        self.dir = os.path.join(run_dir, f'dovecot-{port}')
        os.makedirs(self.dir)
        # the daemon keeps its stdout: a file, not a pipe to wait on
        with open(os.path.join(self.dir, 'start.log'), 'wb') as out:
            r = subprocess.run(['sh', self.SCRIPT, self.dir, str(port)],
                               stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=60)
        pidfile = os.path.join(self.dir, 'run', 'master.pid')
        self.pid = None
        if os.path.exists(pidfile):
            with open(pidfile) as f:
                self.pid = int(f.read().strip())
            self.entry = reg.add(self.pid, 'popen', ['dovecot', '-c', self.dir])
        if r.returncode != 0 or not self.pid:
            if self.pid:
                self.stop()
            raise BenchError(f'dovecot did not start: see {self.dir}/start.log')
        # the bench recipient rcpt@bench.test (auth_username_format %Ln):
        # passwd-file is read again when it changes
        users = os.path.join(self.dir, 'users')
        with open(users) as f:
            alice = f.readline()
        with open(users, 'a') as f:
            f.write(alice.replace('alice', 'rcpt'))
        self.new = os.path.join(self.dir, 'mail', 'rcpt', 'Maildir', 'new')
        self.count = 0
        self.events = []
        self.cond = threading.Condition()
        self.stopped = threading.Event()
        self.poller = threading.Thread(target=self._poll, daemon=True)
        self.poller.start()
        try:
            wait_banner(port, time.monotonic() + 15, lambda: alive(self.pid))
        except BenchError:
            self.stop()
            raise

    def _poll(self):
        while not self.stopped.wait(self.POLL):
            try:
                n = len(os.listdir(self.new))
            except OSError:
                continue
            now = time.perf_counter()
            with self.cond:
                if n != self.count:
                    self.count = n
                    self.events.append((now, n))
                    self.cond.notify_all()

    def running(self):
        return alive(self.pid)

    def cpu_ticks(self):
        total = 0
        for pid in tree([self.pid]):
            st = proc_stat(pid)
            total += st[2] if st else 0
        return total

    def stop(self):
        self.stopped.set()
        if not self.pid:
            return
        subprocess.run(['doveadm', '-c', os.path.join(self.dir, 'dovecot.conf'),
                        'stop'], capture_output=True, timeout=30)
        deadline = time.monotonic() + 10
        while alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop_entry(self.entry)
        self.reg.remove(self.entry)


# -------------------------------------------------------------- relays ----

class Relay:
    name = '?'

    def roots(self):
        return [self.pid]

    def stop(self):
        stop_entry(self.entry)
        self.reg.remove(self.entry)


class PostfixRelay(Relay):
    name = 'postfix'

    def __init__(self, listen_port, sink_port, lmtp, reg, run_dir, tls=None,
                 reuse=False):
        """tls: None, or dict(down=bool, up=bool, pki=make_pki's dict):
        implicit TLS to the sink (smtp_tls_wrappermode) and/or on the
        listener (smtpd_tls_wrappermode); reuse: smtp_tls_connection_reuse
        (through tlsproxy) for the TLS downstream."""
        if os.geteuid() != 0:
            raise Skip('postfix needs root (its master runs as root)')
        if not shutil.which('postfix'):
            raise Skip('postfix not installed: run benchmarks/setup.sh')
        self.reg = reg
        d = os.path.join(run_dir, f'postfix-{listen_port}')
        self.dir = d
        self.conf = os.path.join(d, 'etc')
        self.queue = os.path.join(d, 'spool')
        self.maillog = os.path.join(d, 'maillog')
        data = os.path.join(d, 'data')
        for p in (self.conf, self.queue, data):
            os.makedirs(p)
        shutil.chown(data, 'postfix', 'postfix')
        lmtp_line = (f'default_transport = lmtp:inet:{HOST}:{sink_port}'
                     if lmtp else '# downstream speaks SMTP: relayhost is used')
        tls_lines, smtpd_opts = [], ''
        if tls and tls['down']:
            tls_lines += ['smtp_tls_wrappermode = yes',
                          'smtp_tls_security_level = encrypt']
            if reuse:
                tls_lines.append('smtp_tls_connection_reuse = yes')
        if tls and tls['up']:
            tls_lines += [f'smtpd_tls_cert_file = {tls["pki"]["cert"]}',
                          f'smtpd_tls_key_file = {tls["pki"]["key"]}']
            smtpd_opts = ('\n  -o smtpd_tls_wrappermode=yes'
                          '\n  -o smtpd_tls_security_level=encrypt')
        values = dict(queue_dir=self.queue, data_dir=data, sink_port=sink_port,
                      listen_port=listen_port, maillog=self.maillog,
                      work_dir=d, lmtp_transport=lmtp_line,
                      tls='\n'.join(tls_lines) or '# no TLS',
                      smtpd_opts=smtpd_opts)
        for name, src in (('main.cf', 'main.cf.in'), ('master.cf', 'master.cf')):
            with open(os.path.join(PEERS, 'postfix', src)) as f:
                text = render(f.read(), values)
            with open(os.path.join(self.conf, name), 'w') as f:
                f.write(text)
        r = subprocess.run(['postfix', '-c', self.conf, 'start'], timeout=60,
                           capture_output=True, text=True)
        pidfile = os.path.join(self.queue, 'pid', 'master.pid')
        pid = None
        if os.path.exists(pidfile):
            with open(pidfile) as f:
                pid = int(f.read().strip() or 0) or None
        if r.returncode != 0 or not pid or not alive(pid):
            tail = ''
            if os.path.exists(self.maillog):
                with open(self.maillog) as f:
                    tail = ''.join(f.readlines()[-5:])
            raise BenchError(f'postfix start failed: {r.stderr}{tail}')
        self.pid = pid
        self.entry = reg.add(pid, 'postfix', ['postfix', '-c', self.conf],
                             conf=self.conf)
        try:
            if tls and tls['up']:
                if not wait_listening(listen_port, time.monotonic() + 30,
                                      lambda: alive(pid)):
                    raise BenchError(f'postfix: nothing listens on {listen_port}')
            else:
                wait_banner(listen_port, time.monotonic() + 30, lambda: alive(pid))
        except BenchError:
            self.stop()
            raise

    def queue_files(self):
        n = 0
        for sub in ('maildrop', 'incoming', 'active', 'deferred', 'hold'):
            for _, _, files in os.walk(os.path.join(self.queue, sub)):
                n += len(files)
        return n

    def log_counts(self):
        c = {'sent': 0, 'deferred': 0, 'bounced': 0}
        try:
            with open(self.maillog, errors='replace') as f:
                for line in f:
                    m = re.search(r' status=(\w+)', line)
                    if m and m.group(1) in c:
                        c[m.group(1)] += 1
        except OSError:
            pass
        return c


class HarakaRelay(Relay):
    name = 'haraka'

    def __init__(self, listen_port, sink_port, lmtp, reg, run_dir):
        if lmtp:
            raise Skip('haraka: its queue/lmtp is store-and-forward '
                       '(outbound); no inline LMTP forwarding to compare')
        if not os.path.exists(HARAKA_BIN):
            raise Skip(f'haraka not installed ({HARAKA_BIN}); '
                       'run WITH_HARAKA=1 sh benchmarks/setup.sh')
        self.reg = reg
        d = os.path.join(run_dir, f'haraka-{listen_port}')
        src = os.path.join(PEERS, 'haraka')
        shutil.copytree(src, d)
        values = dict(listen_port=listen_port, sink_port=sink_port)
        for name in os.listdir(os.path.join(d, 'config')):
            p = os.path.join(d, 'config', name)
            with open(p) as f:
                text = f.read()
            with open(p, 'w') as f:
                f.write(render(text, values))
        self.logf = open(os.path.join(d, 'haraka.log'), 'wb')
        cmd = ['node', HARAKA_BIN, '-c', d]
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=d)
        self.pid = self.proc.pid
        self.entry = reg.add(self.pid, 'popen', cmd)
        try:
            wait_banner(listen_port, time.monotonic() + 60,
                        lambda: self.proc.poll() is None)
        except BenchError:
            self.stop()
            raise

    def stop(self):
        super().stop()
        self.logf.close()


class CommandRelay(Relay):
    """Any relay started by a shell command with {listen_port}, {sink_port},
    {listen_host}, {sink_host}, {sink_proto}, {work_dir} placeholders, and
    {config}: the path of config_template rendered with the same
    placeholders into the work dir (when a template is given)."""

    def __init__(self, name, cmd_template, listen_port, sink_port, lmtp, reg,
                 run_dir, start_timeout, cwd=None, config_template=None,
                 tls=None, reuse_port=False, tag=''):
        self.name = name
        self.reg = reg
        d = os.path.join(run_dir, f'{name}-{listen_port}{tag}')
        os.makedirs(d)
        values = dict(
            listen_port=listen_port, sink_port=sink_port, listen_host=HOST,
            sink_host=HOST, sink_proto='lmtp' if lmtp else 'smtp', work_dir=d,
            **tls_values(tls, reuse_port))
        if config_template:
            conf = os.path.join(d, os.path.basename(config_template)
                                .removesuffix('.in'))
            with open(config_template) as f:
                text = render(f.read(), values)
            with open(conf, 'w') as f:
                f.write(text)
            values['config'] = conf
        cmd = render(cmd_template, values)
        self.logf = open(os.path.join(d, 'relay.log'), 'wb')
        self.proc = subprocess.Popen(cmd, shell=True, start_new_session=True,
                                     stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd)
        self.pid = self.proc.pid
        self.entry = reg.add(self.pid, 'pgroup', cmd)
        try:
            if tls and tls['up']:
                if not wait_listening(listen_port, time.monotonic() + start_timeout,
                                      lambda: self.proc.poll() is None):
                    raise BenchError('nothing listens')
            else:
                wait_banner(listen_port, time.monotonic() + start_timeout,
                            lambda: self.proc.poll() is None)
        except BenchError:
            self.stop()
            with open(os.path.join(d, 'relay.log'), errors='replace') as f:
                tail = f.read()[-800:]
            raise BenchError(f'relay command did not come up: {cmd}\n{tail}')

    def stop(self):
        super().stop()
        self.logf.close()


def tls_values(tls, reuse_port):
    """The TLS and scale-out placeholders of RELAY_CMD and --relay-config:
    {listen_scheme}, {sink_scheme} (tcp or tls: implicit TLS), {ca_file},
    {cert_file}, {key_file} (the run's self-made CA and the server
    certificate it signed), {tls_server} and {tls_client} (smtprelay's
    directives for them, or empty) and {reuse_port} (smtprelay's
    `reuse_port yes`, or empty)."""
    up, down = bool(tls and tls['up']), bool(tls and tls['down'])
    pki = (tls or {}).get('pki') or dict(ca='', cert='', key='')
    return dict(
        listen_scheme='tls' if up else 'tcp',
        sink_scheme='tls' if down else 'tcp',
        ca_file=pki['ca'], cert_file=pki['cert'], key_file=pki['key'],
        tls_server=f'tls {pki["cert"]} {pki["key"]}' if up else '',
        tls_client=('tls_client {\n    root_ca ' + pki['ca'] + '\n}')
        if down else '',
        reuse_port='reuse_port yes' if reuse_port else '')


class RelayGroup(Relay):
    """Several processes of the relay command on one port (each with
    `reuse_port`): measured as one tree, stopped one by one."""

    def __init__(self, relays, listen_port, deadline):
        self.relays = relays
        self.name = relays[0].name
        # the kernel must have every process's socket before the load starts
        # (the banner of the port proves only that one listens)
        while listeners(listen_port) < len(relays):
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f'only {listeners(listen_port)} of '
                                 f'{len(relays)} processes listen on {listen_port}')
            time.sleep(0.05)

    def roots(self):
        return [r.pid for r in self.relays]

    def stop(self):
        for r in self.relays:
            r.stop()


def listeners(port):
    """Number of TCP sockets listening on port (IPv4, /proc/net/tcp)."""
    n = 0
    with open('/proc/net/tcp') as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == '0A' and int(local.split(':')[1], 16) == port:
                n += 1
    return n


class AiosmtpdRelay(CommandRelay):
    """aiosmtpd with its stock Proxy handler: the relay a Python user writes
    first. It buffers each message and forwards it with smtplib (a new
    connection per message) while the client waits."""

    def __init__(self, listen_port, sink_port, lmtp, reg, run_dir, start_timeout,
                 tls=None):
        if lmtp:
            raise Skip('aiosmtpd: its Proxy handler speaks SMTP only')
        if tls and tls['up']:
            raise Skip('aiosmtpd: its command line has no implicit-TLS listener')
        if not os.path.exists(AIOSMTPD_PY):
            raise Skip(f'aiosmtpd not installed ({AIOSMTPD_PY}); run benchmarks/setup.sh')
        handler = ('CliProxyTLS {sink_host} {sink_port} {ca_file}' if tls
                   else 'CliProxy {sink_host} {sink_port}')
        cmd = (f'exec {AIOSMTPD_PY} -m aiosmtpd -n -l {{listen_host}}:{{listen_port}} '
               f'-c proxyhandler.{handler}')
        super().__init__('aiosmtpd', cmd, listen_port, sink_port, lmtp, reg,
                         run_dir, start_timeout, cwd=os.path.join(PEERS, 'aiosmtpd'),
                         tls=tls)


# ----------------------------------------------------------- sampling ----

class Sampler(threading.Thread):
    """Peak memory and CPU of a relay's process tree (10 Hz).

    One process: its VmHWM (the kernel's peak RSS, exact). A tree of
    processes (Postfix: master, smtpd, cleanup, qmgr, smtp, ...): the peak
    over samples of the sum of their PSS, so that the shared libraries that
    every Postfix process maps are counted once (the sum of RSS, which counts
    them in every process, is kept as peak_rss_sum_kb)."""

    def __init__(self, roots, interval=0.1):
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.stop_ev = threading.Event()
        self.hwm = {}        # pid -> max VmHWM kB
        self.names = {}
        self.peak_sum = 0    # max over samples of sum(VmRSS) kB
        self.peak_pss = 0    # max over samples of sum(Pss) kB
        self.ticks0 = {}     # pid -> ticks at window start
        self.ticks = {}      # pid -> last ticks seen
        self.max_procs = 0
        self.sample(first=True)

    def sample(self, first=False):
        total, n, live = 0, 0, []
        for pid in tree(self.roots):
            s = proc_status(pid)
            st = proc_stat(pid)
            if not s or not st:
                continue
            name = s.get('Name', '?')
            if name in WRAPPERS:
                continue
            n += 1
            live.append(pid)
            self.names[pid] = name
            self.hwm[pid] = max(self.hwm.get(pid, 0), kb(s.get('VmHWM')))
            total += kb(s.get('VmRSS'))
            if first:
                self.ticks0[pid] = st[2]
            self.ticks[pid] = st[2]
        self.peak_sum = max(self.peak_sum, total)
        self.max_procs = max(self.max_procs, n)
        pss = 0
        if n > 1:  # only a tree needs PSS; one process has its exact VmHWM
            pss = sum(pss_kb(p) for p in live)
            self.peak_pss = max(self.peak_pss, pss)
        if first:  # memory when the load starts (after start-up and warm-up)
            self.start_kb = pss if n > 1 else total

    def run(self):
        while not self.stop_ev.wait(self.interval):
            self.sample()

    def current(self):
        """Memory now: (VmRSS of the one process, or sum of PSS over the
        tree; sum of VmRSS over the tree; number of processes)."""
        rss, live = 0, []
        for pid in tree(self.roots):
            s = proc_status(pid)
            if not s or s.get('Name', '?') in WRAPPERS:
                continue
            live.append(pid)
            rss += kb(s.get('VmRSS'))
        if len(live) > 1:
            return sum(pss_kb(p) for p in live), rss, len(live)
        return rss, rss, len(live)

    def finish(self):
        self.stop_ev.set()
        self.join(5)
        self.sample()
        cpu = sum(t - self.ticks0.get(p, 0) for p, t in self.ticks.items())
        by_name = {}
        for p, t in self.ticks.items():
            name = self.names.get(p, '?')
            by_name[name] = by_name.get(name, 0) + (t - self.ticks0.get(p, 0)) / CLK_TCK
        single = max(self.hwm.values(), default=0)
        multi = len(self.hwm) > 1
        return dict(peak_rss_kb=self.peak_pss if multi else single,
                    start_mem_kb=self.start_kb,
                    mem_basis='sum of PSS over the process tree' if multi
                    else 'VmHWM of the process',
                    peak_rss_sum_kb=self.peak_sum,
                    peak_pss_sum_kb=self.peak_pss,
                    max_single_hwm_kb=single,
                    procs=self.max_procs,
                    cpu_s=cpu / CLK_TCK,
                    cpu_by_process_s={k: round(v, 2) for k, v in
                                      sorted(by_name.items(), key=lambda x: -x[1])},
                    top=sorted(((self.names[p], h) for p, h in self.hwm.items()),
                               key=lambda x: -x[1])[:4])


class PySpy:
    """py-spy sampling the relay (a separate process: the relay runs at
    full speed) from the start of the load to its end."""

    def __init__(self, exe, pid, reg, out):
        self.out, self.reg = out, reg
        cmd = [exe, 'record', '--format', 'raw', '--rate', '1000',
               '--nonblocking', '--pid', str(pid), '-o', out]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.entry = reg.add(self.proc.pid, 'popen', cmd)
        time.sleep(0.5)   # it attaches before the load starts

    def finish(self):
        """Stop it (SIGINT: it writes its file) and summarize the file."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reg.remove(self.entry)
        if not os.path.exists(self.out):
            return None
        summary = pyspy.summarize(self.out)
        summary['file'] = self.out
        return summary


# ---------------------------------------------------------------- load ----

def run_source(port, wl, lmtp, limit_s, run_dir, reg):
    """smtp-source bounded by -m and by limit_s, wl['rounds'] times one
    after another (msgs/rounds messages each: with -d, sessions of about
    msgs/rounds/sessions messages); returns (rc, t_start, t_end, cpu_s,
    stderr tail, command line)."""
    rounds = wl.get('rounds', 1)
    t0 = time.perf_counter()
    deadline = time.monotonic() + limit_s
    cpu = 0.0
    for _ in range(rounds):
        rc, _, t_end, c, tail, cmd = _run_source(
            port, dict(wl, msgs=wl['msgs'] // rounds), lmtp,
            max(1, deadline - time.monotonic()), run_dir, reg)
        cpu += c or 0
        if rc != 0:
            break
    if rounds > 1:
        cmd = f'{rounds} x {cmd}'
    return rc, t0, t_end, cpu, tail, cmd


def _run_source(port, wl, lmtp, limit_s, run_dir, reg):
    cmd = ['smtp-source', '-s', str(wl['sessions']), '-m', str(wl['msgs']),
           '-l', str(wl['size']), '-f', SENDER, '-t', RCPT, '-M', HELO]
    if wl['reuse']:
        cmd.append('-d')
    if lmtp:
        cmd.append('-L')
    cmd.append(f'{HOST}:{port}')
    errp = os.path.join(run_dir, f'source-{port}.err')
    with open(errp, 'ab') as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL)
        entry = reg.add(proc.pid, 'popen', cmd)
        res = {}

        def waiter():
            _, status, ru = os.wait4(proc.pid, 0)
            res['t'] = time.perf_counter()
            res['status'] = status
            res['ru'] = ru
        th = threading.Thread(target=waiter, daemon=True)
        th.start()
        th.join(limit_s)
        if th.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            th.join(5)
            proc.returncode = -9
            rc = 'timeout'
        else:
            proc.returncode = os.waitstatus_to_exitcode(res['status'])
            rc = proc.returncode
        reg.remove(entry)
    with open(errp, errors='replace') as f:
        tail = f.read()[-300:].strip()
    ru = res.get('ru')
    cpu = (ru.ru_utime + ru.ru_stime) if ru else None
    return rc, t0, res.get('t', time.perf_counter()), cpu, tail, ' '.join(cmd)


def run_latency(port, wl, lmtp, sink, base, deadline):
    """wl['msgs'] sessions one after another, one message each: per message
    the time from connect to the reply to '.' (accept) and to the sink
    counting it (e2e)."""
    acc, e2e = [], []
    t_start = time.perf_counter()
    cls = smtplib.LMTP if lmtp else smtplib.SMTP
    for i in range(wl['msgs']):
        msg = make_message(wl['size'], i)
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError('latency probe ran out of time')
        t0 = time.perf_counter()
        s = cls(HOST, port, local_hostname=HELO, timeout=min(30, left))
        try:
            s.ehlo_or_helo_if_needed()
            s.mail(SENDER)
            code, resp = s.rcpt(RCPT)
            if code != 250:
                raise BenchError(f'RCPT refused: {code} {resp!r}')
            code, resp = s.data(msg)
            t_acc = time.perf_counter()
            if code != 250:
                raise BenchError(f'DATA refused: {code} {resp!r}')
            if not sink.wait_count(base + i + 1, deadline):
                raise BenchError('message never reached the sink')
            t_sink = sink.time_reached(base + i + 1)
            s.quit()
        finally:
            s.close()
        acc.append(t_acc - t0)
        e2e.append(t_sink - t0)
    return t_start, time.perf_counter(), acc, e2e


class IdleSessions:
    """n client sessions held open: each connects, reads the 220 greeting,
    sends EHLO (LHLO to an LMTP server) and reads the 250 reply, then stays
    idle until close(). Driven with non-blocking sockets, at most `ramp`
    sessions on their way in at a time (so that a burst of SYNs does not
    overflow the server's listen backlog, where the kernel would drop them
    and the clients would wait for retransmits); what is not through by the
    deadline is counted as not open."""

    FINAL = re.compile(rb'(?:^|\r\n)(\d{3}) [^\r\n]*\r\n$')

    def __init__(self, port, n, lmtp, deadline, ramp=32):
        self.socks, self.idle = [], []
        self.greeted = self.ready = 0
        self.errors = {}
        verb = b'LHLO ' if lmtp else b'EHLO '
        sel = selectors.DefaultSelector()
        opened = 0
        while time.monotonic() < deadline:
            while opened < n and len(sel.get_map()) < ramp:
                opened += 1
                s = socket.socket()
                s.setblocking(False)
                self.socks.append(s)
                err = s.connect_ex((HOST, port))
                if err not in (0, errno.EINPROGRESS):
                    self._error(os.strerror(err))
                    continue
                sel.register(s, selectors.EVENT_READ,
                             dict(state='greet', buf=b''))
            if not sel.get_map():
                break
            for key, _ in sel.select(min(0.5, max(0.0, deadline - time.monotonic()))):
                s, st = key.fileobj, key.data
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError as e:
                    self._error(e.strerror or str(e))
                    sel.unregister(s)
                    continue
                if not data:
                    self._error('closed by the server')
                    sel.unregister(s)
                    continue
                st['buf'] += data
                m = self.FINAL.search(st['buf'])
                if not m:
                    continue
                code, st['buf'] = m.group(1), b''
                if st['state'] == 'greet':
                    if code != b'220':
                        self._error(f'greeting {code.decode()}')
                        sel.unregister(s)
                        continue
                    self.greeted += 1
                    st['state'] = 'ehlo'
                    try:
                        s.sendall(verb + HELO.encode() + b'\r\n')
                    except OSError as e:
                        self._error(e.strerror or str(e))
                        sel.unregister(s)
                else:
                    if code == b'250':
                        self.ready += 1
                        self.idle.append(s)
                    else:
                        self._error(f'EHLO reply {code.decode()}')
                    sel.unregister(s)
        pending = len(sel.get_map()) + (n - opened)
        if pending:
            self.errors['not through by the deadline'] = pending
        sel.close()

    def _error(self, what):
        self.errors[what] = self.errors.get(what, 0) + 1

    def still_open(self):
        """Idle sessions the server has not closed meanwhile (peek)."""
        n = 0
        for s in self.idle:
            try:
                s.recv(1, socket.MSG_PEEK)
                # EOF (closed by the server) or unprompted data (e.g. a 421)
            except BlockingIOError:
                n += 1     # nothing to read: still open and quiet
            except OSError:
                pass
        return n

    def close(self):
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


def probe(port, lmtp, sink, deadline):
    """One message; the time until the sink counted it (seconds)."""
    cls = smtplib.LMTP if lmtp else smtplib.SMTP
    base = sink.count
    t0 = time.perf_counter()
    with cls(HOST, port, local_hostname=HELO,
             timeout=max(1, min(30, deadline - time.monotonic()))) as s:
        s.sendmail(SENDER, [RCPT], make_message(KB, -2))
    if not sink.wait_count(base + 1, deadline):
        raise BenchError('the probe message never reached the sink')
    return sink.time_reached(base + 1) - t0


def warmup(port, lmtp, sink, deadline):
    cls = smtplib.LMTP if lmtp else smtplib.SMTP
    base = sink.count
    with cls(HOST, port, local_hostname=HELO, timeout=30) as s:
        s.sendmail(SENDER, [RCPT], make_message(KB, -1))
    if not sink.wait_count(base + 1, deadline):
        raise BenchError('warm-up message never reached the sink')


# ------------------------------------------------------------ one run ----

def system_label(system, args):
    if system == 'relay':
        return args.relay_name
    if system == 'relay-x2':
        return f'{args.relay_name} x2'
    return system


def one_run(system, wl_name, rep, args, reg, run_dir, pki=None):
    wl = WORKLOADS[wl_name]
    lmtp = args.downstream == 'lmtp' or bool(wl.get('dovecot'))
    tls = None
    if wl.get('tls_down') or wl.get('tls_up'):
        tls = dict(down=bool(wl.get('tls_down')), up=bool(wl.get('tls_up')),
                   pki=pki)
    row = dict(workload=wl_name, system=system_label(system, args),
               rep=rep, msgs=wl['msgs'], size=wl['size'],
               sessions=wl['sessions'],
               downstream='lmtp (dovecot)' if wl.get('dovecot') else args.downstream,
               kind=wl['kind'], is_relay=system in ('relay', 'relay-x2'),
               relay_procs=2 if system == 'relay-x2' else 1,
               tls_down=bool(tls and tls['down']), tls_up=bool(tls and tls['up']),
               status='ok', note='')
    ports = set()
    while len(ports) < 4:
        ports.add(free_port())
    sink_port, listen_port, sink_tls_port, source_tls_port = ports
    sink = relay = sampler = spy = None
    tunnels = []
    try:
        if tls and lmtp:
            raise Skip('TLS workloads: SMTP downstream only')
        sink = (DovecotSink(sink_port, reg, run_dir) if wl.get('dovecot')
                else Sink(sink_port, lmtp, reg, run_dir))
        relay_sink_port = sink_port
        if tls and tls['down']:
            tunnels.append(Stunnel(sink_tls_port, sink_port, False, pki, reg,
                                   run_dir))
            relay_sink_port = sink_tls_port
        t_start_relay = time.perf_counter()
        if system == 'direct':
            port, src_lmtp = sink_port, lmtp
            if tls:
                # the TLS hop without a relay: stunnel client -> stunnel
                # server -> sink
                tunnels.append(Stunnel(source_tls_port, sink_tls_port, True,
                                       pki, reg, run_dir))
                port = source_tls_port
        else:
            if system in ('postfix', 'postfix-reuse'):
                relay = PostfixRelay(listen_port, relay_sink_port, lmtp, reg,
                                     run_dir, tls, reuse=system == 'postfix-reuse')
            elif system == 'haraka':
                if tls:
                    raise Skip('haraka: not set up for TLS')
                relay = HarakaRelay(listen_port, sink_port, lmtp, reg, run_dir)
            elif system == 'aiosmtpd':
                relay = AiosmtpdRelay(listen_port, relay_sink_port, lmtp, reg,
                                      run_dir, args.start_timeout, tls)
            elif system == 'relay-x2':
                started = []
                try:
                    for k in range(2):
                        started.append(CommandRelay(
                            args.relay_name, args.relay_cmd, listen_port,
                            relay_sink_port, lmtp, reg, run_dir,
                            args.start_timeout, args.relay_cwd,
                            args.relay_config, tls, reuse_port=True,
                            tag=f'-{k + 1}'))
                except BaseException:
                    for r in started:
                        r.stop()
                    raise
                relay = RelayGroup(started, listen_port,
                                   time.monotonic() + args.start_timeout)
            else:
                relay = CommandRelay(args.relay_name, args.relay_cmd,
                                     listen_port, relay_sink_port, lmtp, reg,
                                     run_dir, args.start_timeout,
                                     args.relay_cwd, args.relay_config, tls)
            port, src_lmtp = listen_port, False
            if tls and tls['up']:
                tunnels.append(Stunnel(source_tls_port, listen_port, True,
                                       pki, reg, run_dir))
                port = source_tls_port
                # through the tunnel, the system's greeting proves the chain
                wait_banner(port, time.monotonic() + 30)
        row['startup_s'] = round(time.perf_counter() - t_start_relay, 3)
        deadline = time.monotonic() + wl['limit']
        if not args.no_warmup:
            warmup(port, src_lmtp, sink, deadline)
        base = sink.count
        if relay:
            sampler = Sampler(relay.roots())
            sampler.start()
        if args.py_spy and system == 'relay':
            spy = PySpy(args.py_spy, relay.pid, reg,
                        os.path.join(run_dir, f'py-spy-{wl_name}-{rep}.txt'))
        sink_t0 = sink.cpu_ticks()
        tunnels_t0 = sum(t.cpu_ticks() for t in tunnels)
        busy0, udp0, self0 = cpu_busy(), udp_out(), self_cpu()
        if wl['kind'] == 'idle':
            if system == 'direct':
                raise Skip('no relay to measure (and smtp-sink serves '
                           '256 sessions at most)')
            t0 = time.perf_counter()
            idle = IdleSessions(port, wl['sessions'], src_lmtp,
                                min(deadline, time.monotonic() + wl['open_limit']))
            try:
                row['idle_open_s'] = round(time.perf_counter() - t0, 3)
                row['idle_greeted'] = idle.greeted
                row['idle_ready'] = idle.ready
                row['idle_errors'] = idle.errors
                time.sleep(wl['hold'])
                if sampler:
                    cur, rss_sum, nproc = sampler.current()
                    row['plateau_mem_kb'] = cur
                    row['plateau_rss_sum_kb'] = rss_sum
                    row['plateau_procs'] = nproc
                    row['idle_base_mem_kb'] = sampler.start_kb
                    row['per_session_kb'] = round(
                        (cur - sampler.start_kb) / max(1, idle.ready), 1)
                row['idle_still_open'] = idle.still_open()
                t_acc = time.perf_counter()
                try:
                    row['probe_ms'] = round(1000 * probe(port, src_lmtp, sink,
                                                         deadline), 3)
                    row['served'] = True
                except (BenchError, OSError, smtplib.SMTPException) as e:
                    row['served'] = False
                    row['note'] += f' not serving with the sessions open: {e}'
                row['idle_still_open_after'] = idle.still_open()
            finally:
                idle.close()
            n = wl['sessions']
            row['note'] += (f' {idle.ready}/{n} idle'
                            f' ({row["idle_open_s"]:.1f}s)')
            if row.get('served'):
                row['note'] += f', served in {row["probe_ms"]:.1f} ms'
            if idle.ready < n or row['idle_still_open'] < n:
                row['status'] = 'FAIL'
                row['note'] += (f', only {idle.ready} sessions got to EHLO, '
                                f'{row["idle_still_open"]} still open: '
                                f'{idle.errors}')
            row['source_cpu_s'] = None
        elif wl['kind'] == 'source':
            rc, t0, t_acc, src_cpu, tail, cmd = run_source(
                port, wl, src_lmtp, max(1, deadline - time.monotonic()), run_dir,
                reg)
            row['source_cmd'] = cmd
            row['source_cpu_s'] = src_cpu
            if rc != 0:
                row['status'] = 'FAIL'
                row['note'] = f'smtp-source rc={rc}: {tail}'
                # what was accepted may still drain; do not wait the full limit
                deadline = min(deadline, time.monotonic() + 10)
        else:
            t0, t_acc, acc, e2e = run_latency(port, wl, src_lmtp, sink, base,
                                              deadline)
            row['lat_accept_ms'] = [round(x * 1000, 3) for x in acc]
            row['lat_e2e_ms'] = [round(x * 1000, 3) for x in e2e]
            row['p50_accept_ms'] = round(statistics.median(acc) * 1000, 3)
            row['p50_e2e_ms'] = round(statistics.median(e2e) * 1000, 3)
            row['p90_e2e_ms'] = round(sorted(e2e)[int(0.9 * len(e2e)) - 1]
                                      * 1000, 3)
            # nearest rank: the 19th of 20
            k95 = math.ceil(0.95 * len(e2e)) - 1
            row['p95_accept_ms'] = round(sorted(acc)[k95] * 1000, 3)
            row['p95_e2e_ms'] = round(sorted(e2e)[k95] * 1000, 3)
            row['source_cpu_s'] = None
        target = base + wl['msgs']
        got = sink.wait_count(target, deadline)
        t_end = sink.time_reached(target) if got else None
        busy1, udp1, self1 = cpu_busy(), udp_out(), self_cpu()
        row['sink_cpu_s'] = (sink.cpu_ticks() - sink_t0) / CLK_TCK
        # stunnel's CPU is the TLS peers' (the sink's and the client's side)
        row['stunnel_cpu_s'] = (sum(t.cpu_ticks() for t in tunnels)
                                - tunnels_t0) / CLK_TCK
        row['harness_cpu_s'] = self1 - self0
        if sampler:
            row.update(sampler.finish())
            sampler = None
        if spy:
            row['profile'] = spy.finish()
            spy = None
        row['accept_s'] = t_acc - t0
        row['delivered'] = sink.count - base
        if got:
            row['e2e_s'] = max(t_end, t0) - t0
            if wl['kind'] == 'source' and t_end < t_acc:
                # inline relays and direct: the sink counts '.' just before
                # the client sees its reply; the client finishing is the end
                row['e2e_s'] = row['accept_s']
        else:
            row['e2e_s'] = None
            row['status'] = 'FAIL'
            row['note'] += (f' sink got {sink.count - base}/{wl["msgs"]} '
                            f'within {wl["limit"]}s')
        dt_busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
        row['box_busy_pct'] = round(100 * dt_busy, 1)
        window = time.perf_counter() - t0
        known = sum(row.get(k) or 0 for k in ('cpu_s', 'sink_cpu_s',
                                               'source_cpu_s', 'harness_cpu_s',
                                               'stunnel_cpu_s'))
        # CPU used by anything else on the box, in % of one core (coarse:
        # /proc/stat and /proc/PID/stat tick at 10 ms)
        row['other_cpu_pct'] = round(100 * (dt_busy * (os.cpu_count() or 1)
                                            - known / max(window, 1e-6)), 0)
        row['udp_out'] = udp1 - udp0
        if row['udp_out']:
            # everything here is TCP on loopback: UDP means a DNS lookup
            row['note'] += f' {row["udp_out"]} UDP datagrams sent (DNS?)'
        if isinstance(relay, PostfixRelay):
            row['postfix_log'] = relay.log_counts()
            row['postfix_queue_left'] = relay.queue_files()
        if row.get('peak_rss_kb') and row.get('start_mem_kb') is not None:
            # iii: what the message itself cost over the idle process
            row['mem_growth_kb'] = row['peak_rss_kb'] - row['start_mem_kb']
            if wl_name == 'iii':
                row['note'] += (f' +{row["mem_growth_kb"] / 1024:.1f} MB over idle '
                                f'{row["start_mem_kb"] / 1024:.1f} MB')
    except Skip as e:
        row['status'] = 'skip'
        row['note'] = str(e)
    except Exception as e:  # noqa: BLE001 - one failed run must not stop the rest
        row['status'] = 'FAIL'
        row['note'] = f'{type(e).__name__}: {e}'.strip()[:400]
    finally:
        if sampler:
            sampler.finish()
        if spy:
            spy.finish()
        if relay:
            relay.stop()
        for t in reversed(tunnels):
            t.stop()
        if sink:
            sink.stop()
    return row


# -------------------------------------------------------------- report ----

def fmt(v, spec, empty='-'):
    return empty if v is None else format(v, spec)


def kind_of(r):
    return r.get('kind') or WORKLOADS.get(r['workload'], {}).get('kind', 'source')


def mem_kb(r):
    """The memory figure of a row: the RSS at the plateau for v (500 idle
    sessions), else the peak (VmHWM of one process / peak sum of PSS of a
    process tree)."""
    if kind_of(r) == 'idle':
        return r.get('plateau_mem_kb')
    return r.get('peak_rss_kb')


def _mean(rows, key):
    vals = [key(r) for r in rows or ()]
    vals = [v for v in vals if v is not None]
    return statistics.mean(vals) if vals else None


def _ok_groups(rows):
    ok = {}
    for r in rows:
        if r['status'] == 'ok':
            ok.setdefault((r['workload'], r['system']), []).append(r)
    return ok


def derive(rows):
    for r in rows:
        msgs_rate = kind_of(r) != 'idle'   # v: msgs/s means nothing
        r['accept_mps'] = (r['msgs'] / r['accept_s']
                           if msgs_rate and r.get('accept_s') else None)
        r['e2e_mps'] = (r['msgs'] / r['e2e_s']
                        if msgs_rate and r.get('e2e_s') else None)
    ok = _ok_groups(rows)
    for r in rows:
        w, kind = r['workload'], kind_of(r)
        d, pf = ok.get((w, 'direct')), ok.get((w, 'postfix'))
        r['x_direct'] = r['x_postfix_mps'] = r['x_postfix_mem'] = None
        r['p50_vs_direct_ms'] = None
        if r['status'] == 'ok':
            if kind == 'latency':
                base = _mean(d, lambda x: x.get('p50_e2e_ms'))
                if base:
                    r['x_direct'] = r['p50_e2e_ms'] / base
                    r['p50_vs_direct_ms'] = round(r['p50_e2e_ms'] - base, 3) or 0.0
            elif kind == 'source' and r.get('e2e_s'):
                base = _mean(d, lambda x: x.get('e2e_s'))
                if base:
                    r['x_direct'] = r['e2e_s'] / base
            if kind == 'source' and r.get('e2e_mps'):
                base = _mean(pf, lambda x: x.get('e2e_mps'))
                if base:
                    r['x_postfix_mps'] = r['e2e_mps'] / base
            base = _mean(pf, mem_kb)
            if base and mem_kb(r):
                r['x_postfix_mem'] = mem_kb(r) / base
        # the relay's CPU per message: what it costs, less sensitive than
        # msgs/s to other jobs taking the cores (Postfix: all its processes)
        r['cpu_ms_per_msg'] = (1000 * r['cpu_s'] / r['msgs']
                               if r.get('cpu_s') and msgs_rate else None)
        for k in ('cpu_s', 'sink_cpu_s', 'source_cpu_s', 'harness_cpu_s'):
            pct = None
            if r.get(k) is not None and r.get('e2e_s'):
                pct = 100 * r[k] / r['e2e_s']
            r[k.replace('_s', '_pct')] = pct
        r['target'] = None
        if r.get('is_relay') and w in TARGETS:
            r['target'], r['target_detail'] = check_target(w, [r], ok)


def check_target(w, rs, ok):
    """(PASS | FAIL | n/a, detail) for the relay rows rs of workload w
    against the performance targets; the peers' figures are the means of their ok
    runs of the same workload in the same results."""
    if not rs:
        return 'n/a', 'not run'
    bad = [r for r in rs if r['status'] != 'ok']
    if bad:
        return 'FAIL', 'run failed: ' + (bad[0]['note'].strip()[:100] or '?')

    def ref(system, key):
        return _mean(ok.get((w, system)), key)

    if w in ('i', 'ii'):
        mps = _mean(rs, lambda r: r.get('e2e_mps'))
        need = [('postfix', 1.5), ('aiosmtpd', 1.3)] if w == 'i' else [('postfix', 1.0)]
        parts, passed = [], True
        for system, factor in need:
            base = ref(system, lambda r: r.get('e2e_mps'))
            if base is None:
                if system == 'postfix':
                    return 'n/a', 'no ok postfix run to compare with'
                parts.append(f'no {system} run')
                continue
            x = mps / base
            passed = passed and x >= factor
            parts.append(f'{mps:.0f} msg/s = {x:.2f}x {system} (>= {factor})')
        return ('PASS' if passed else 'FAIL'), ', '.join(parts)
    if w == 'iii':
        m = max(r.get('peak_rss_kb') or 0 for r in rs) / 1024
        g = max(r.get('mem_growth_kb') or 0 for r in rs) / 1024
        idle = min(r.get('start_mem_kb') or 0 for r in rs) / 1024
        return (('PASS' if m <= 40 and g <= 1 else 'FAIL'),
                f'peak RSS {m:.1f} MB (<= 40) = idle {idle:.1f} MB '
                f'+ growth {g:.1f} MB (<= 1)')
    mps = _mean(rs, lambda r: r.get('e2e_mps'))

    def versus(w2, system, factor):
        base = _mean(ok.get((w2, system)), lambda r: r.get('e2e_mps'))
        if base is None:
            return None, f'no ok {system} run of {w2}'
        x = mps / base
        return x >= factor, f'{x:.2f}x {system}{"" if w2 == w else " " + w2} (>= {factor})'

    def verdict(*checks):
        """FAIL if a check failed, n/a if one could not be made, else PASS."""
        known = [c for c, _ in checks if c is not None]
        v = ('FAIL' if not all(known) else
             'n/a' if len(known) < len(checks) else 'PASS')
        return v, f'{mps:.0f} msg/s = ' + ', '.join(d for _, d in checks)
    if w == 'vi':
        return verdict(versus(w, 'postfix-reuse', 3.5),
                       versus('i', rs[0]['system'], 0.8))
    if w in ('vii-10', 'vii-1'):
        return verdict(versus(w, 'postfix', 2.0 if w == 'vii-10' else 1.2))
    if w == 'viii':
        if rs[0].get('relay_procs', 1) == 1:
            return 'n/a', f'{mps:.0f} msg/s: the one-process baseline'
        one = rs[0]['system'].removesuffix(' x2')
        return verdict(versus(w, one, 1.6), versus(w, 'postfix', 6.0))
    if w == 'iv':
        p50 = _mean(rs, lambda r: r.get('p50_e2e_ms'))
        p95 = _mean(rs, lambda r: r.get('p95_e2e_ms'))
        base = ref('direct', lambda r: r.get('p50_e2e_ms'))
        if base is None:
            return 'n/a', 'no ok direct run to compare with'
        delta = p50 - base
        return (('PASS' if delta <= 1.0 else 'FAIL'),
                f'p50 {p50:.2f} ms = direct {base:.2f} + {delta:.2f} ms (<= +1), '
                f'p95 {fmt(p95, ".2f")} ms')
    if w == 'v':
        m = max(r.get('plateau_mem_kb') or 0 for r in rs) / 1024
        served = all(r.get('served') for r in rs)
        ready = min(r.get('idle_ready') or 0 for r in rs)
        passed = m <= 150 and served and ready >= WORKLOADS['v']['sessions']
        per = _mean(rs, lambda r: r.get('per_session_kb'))
        return (('PASS' if passed else 'FAIL'),
                f'RSS {m:.1f} MB (<= 150) with {ready} idle sessions '
                f'({fmt(per, ".0f")} KB each), '
                + ('still serving' if served else 'NOT serving'))
    return 'n/a', 'no target'


HEAD = ['workload', 'system', 'rep', 'msgs/s', 'wall s', 'accept s',
        'accept msg/s', 'mem MB', 'x direct', 'msgs/s x pf', 'mem x pf',
        'p50 ms', 'p95 ms', '+direct ms', 'relay cpu%', 'cpu ms/msg', 'sink cpu%',
        'src cpu%', 'other cpu%', 'target', 'status']


def _grid(head, out):
    widths = [max(len(head[i]), *(len(x[i]) for x in out)) if out else len(head[i])
              for i in range(len(head))]
    lines = [' | '.join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
             '-+-'.join('-' * w for w in widths)]
    lines += [' | '.join(v.ljust(w) for v, w in zip(x, widths)).rstrip()
              for x in out]
    return lines


def table(rows):
    out = []
    for r in rows:
        p50 = p95 = None
        if r.get('p50_e2e_ms') is not None:
            p50 = f'{r["p50_accept_ms"]:.2f}/{r["p50_e2e_ms"]:.2f}'
        if r.get('p95_e2e_ms') is not None:
            p95 = f'{r["p95_accept_ms"]:.2f}/{r["p95_e2e_ms"]:.2f}'
        mem = mem_kb(r)
        out.append([
            r['workload'], r['system'], str(r['rep']),
            fmt(r.get('e2e_mps'), '.1f'),
            fmt(r.get('e2e_s') if kind_of(r) != 'idle' else None, '.3f'),
            fmt(r.get('accept_s') if kind_of(r) != 'idle' else None, '.3f'),
            fmt(r.get('accept_mps'), '.1f'),
            fmt(mem / 1024 if mem else None, '.1f'),
            fmt(r.get('x_direct'), '.2f'), fmt(r.get('x_postfix_mps'), '.2f'),
            fmt(r.get('x_postfix_mem'), '.2f'), p50 or '-', p95 or '-',
            fmt(r.get('p50_vs_direct_ms'), '+.2f'),
            fmt(r.get('cpu_pct'), '.0f'), fmt(r.get('cpu_ms_per_msg'), '.2f'),
            fmt(r.get('sink_cpu_pct'), '.0f'),
            fmt(r.get('source_cpu_pct'), '.0f'), fmt(r.get('other_cpu_pct'), '.0f'),
            r.get('target') or '',
            r['status'] + (f' ({r["note"].strip()[:70]})' if r['note'].strip() else ''),
        ])
    return '\n'.join(_grid(HEAD, out))


def summary(rows):
    """Mean over the runs of each workload x system; ± is half the range of
    msgs/s over those runs, in % of the mean (the run-to-run noise)."""
    groups = {}
    for r in rows:
        groups.setdefault((r['workload'], r['system']), []).append(r)
    head = ['workload', 'system', 'runs ok', 'msgs/s', '± %', 'MB/s', 'wall s',
            'accept s', 'mem MB', 'x direct', 'msgs/s x pf', 'mem x pf',
            'p50 e2e ms', 'p95 e2e ms', '+direct ms', 'cpu ms/msg']
    out = []
    for (w, s), rs in groups.items():
        ok = [r for r in rs if r['status'] == 'ok']
        run = [r for r in rs if r['status'] != 'skip']
        line = [w, s, f'{len(ok)}/{len(run)}' if run else 'skip']
        if not ok:
            out.append(line + ['-'] * (len(head) - 3))
            continue
        mps = [r['e2e_mps'] for r in ok if r.get('e2e_mps')]
        m = statistics.mean(mps) if mps else None
        half = 50 * (max(mps) - min(mps)) / m if m else None
        mem = [mem_kb(r) for r in ok if mem_kb(r)]

        def mean(key, spec):
            return fmt(_mean(ok, key), spec)
        line += [fmt(m, '.1f'), fmt(half, '.0f'),
                 fmt(m * ok[0]['size'] / MB if m else None, '.1f'),
                 fmt(_mean(ok, lambda r: r.get('e2e_s')) if mps else None, '.3f'),
                 fmt(_mean(ok, lambda r: r.get('accept_s')) if mps else None, '.3f'),
                 fmt(max(mem) / 1024 if mem else None, '.1f'),
                 mean(lambda r: r.get('x_direct'), '.2f'),
                 mean(lambda r: r.get('x_postfix_mps'), '.2f'),
                 mean(lambda r: r.get('x_postfix_mem'), '.2f'),
                 mean(lambda r: r.get('p50_e2e_ms'), '.2f'),
                 mean(lambda r: r.get('p95_e2e_ms'), '.2f'),
                 mean(lambda r: r.get('p50_vs_direct_ms'), '+.2f'),
                 mean(lambda r: r.get('cpu_ms_per_msg'), '.2f')]
        out.append(line)
    lines = ['summary (mean of runs; ± = half the range of msgs/s, % of mean; '
             'mem: max of runs)']
    return '\n'.join(lines + _grid(head, out))


def targets(rows):
    """The relay's verdicts against the performance targets, from all its runs."""
    ok = _ok_groups(rows)
    relays = []
    for r in rows:
        if r.get('is_relay') and r['system'] not in relays:
            relays.append(r['system'])
    lines, verdicts = [], []
    for name in relays:
        lines.append(f'performance targets for {name}:')
        out = []
        for w in WORKLOADS:
            rs = [r for r in rows if r['system'] == name and r['workload'] == w]
            if w not in TARGETS or not rs:
                continue
            v, detail = check_target(w, rs, ok)
            verdicts.append(v)
            out.append([w, TARGETS[w], v, detail])
        lines += ['  ' + x for x in _grid(['workload', 'target', 'verdict',
                                           'measured'], out)]
    return '\n'.join(lines), verdicts


def profiles(rows):
    """The py-spy summaries of the relay rows (--py-spy), as text."""
    lines = []
    for r in rows:
        p = r.get('profile')
        if not p:
            continue
        centres = ', '.join(f'{k} {v:.0f}%' for k, v in
                            p['centres_pct_of_busy'].items())
        top = ', '.join(f'{k} {v:.0f}%' for k, v in p['top_own_pct_of_busy'][:6])
        lines += [f'profile {r["workload"]} {r["system"]} run {r["rep"]} '
                  f'({p["samples"]} samples; shares of the busy ones): {centres}',
                  f'  own time: {top}']
    return '\n'.join(lines)


def versions():
    v = {'python': sys.version.split()[0], 'kernel': os.uname().release,
         'cpus': os.cpu_count()}
    try:
        v['postfix'] = subprocess.run(['postconf', '-d', '-h', 'mail_version'],
                                      capture_output=True, text=True,
                                      timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        with open(os.path.join(os.path.dirname(HARAKA_BIN), '..', 'package.json')) as f:
            v['haraka'] = json.load(f)['version']
        v['node'] = subprocess.run(['node', '--version'], capture_output=True,
                                   text=True, timeout=10).stdout.strip()
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired):
        pass
    try:
        v['aiosmtpd'] = subprocess.run(
            [AIOSMTPD_PY, '-c', 'import aiosmtpd; print(aiosmtpd.__version__)'],
            capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:  # the project's commit (a dirty tree: the relay differs from it)
        top = os.path.dirname(HERE)
        head = subprocess.run(['git', '-C', top, 'rev-parse', '--short', 'HEAD'],
                              capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(['git', '-C', top, 'status', '--porcelain',
                                    '--untracked-files=no'], capture_output=True,
                                   text=True, timeout=10).stdout.strip()
            v['git'] = head.stdout.strip() + ('-dirty' if dirty else '')
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        with open('/proc/cpuinfo') as f:
            v['cpu'] = next(l.split(':', 1)[1].strip() for l in f
                            if l.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return v


# ---------------------------------------------------------------- main ----

def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--systems', default=None,
                    help='comma list of direct,postfix,haraka,aiosmtpd,relay '
                         '(default: direct,postfix,aiosmtpd, plus relay when '
                         'RELAY_CMD is set; haraka only when asked for)')
    ap.add_argument('--workloads', default=','.join(DEFAULT_WORKLOADS),
                    help=f'comma list of {",".join(WORKLOADS)} '
                         '(vii = vii-10,vii-1)')
    ap.add_argument('--repeat', type=int, default=1,
                    help='runs of each system x workload (default 1)')
    ap.add_argument('--relay-cmd', default=os.environ.get('RELAY_CMD'),
                    help='shell command that starts the relay under test; '
                         'placeholders {listen_port} {sink_port} {listen_host} '
                         '{sink_host} {sink_proto} {work_dir} (env RELAY_CMD)')
    ap.add_argument('--relay-name', default=os.environ.get('RELAY_NAME', 'relay'),
                    help='label of the RELAY_CMD system in the table')
    ap.add_argument('--relay-cwd', default=os.environ.get('RELAY_CWD'),
                    help='directory RELAY_CMD runs in (default: the current '
                         'one; env RELAY_CWD)')
    ap.add_argument('--relay-config', default=os.environ.get('RELAY_CONFIG'),
                    help='template file rendered with the same placeholders '
                         'into the work dir for each relay run; its path is '
                         'the {config} placeholder of RELAY_CMD (env RELAY_CONFIG)')
    ap.add_argument('--start-timeout', type=float, default=30,
                    help='seconds the relay gets to show a 220 banner')
    ap.add_argument('--downstream', choices=['smtp', 'lmtp'], default='smtp',
                    help='protocol the sink speaks (lmtp: smtp-sink -L)')
    ap.add_argument('--no-warmup', action='store_true',
                    help='skip the one warm-up message before each measurement')
    ap.add_argument('--out', default=None,
                    help='JSON results file (default results/<time>.json '
                         'next to run.py)')
    ap.add_argument('--py-spy', metavar='PATH', default=None,
                    help='profile each one-process relay run with this py-spy '
                         'binary (py-spy record --format raw, 1000 Hz); the '
                         'summary goes to the JSON and below the tables')
    ap.add_argument('--keep', action='store_true',
                    help='keep the work dir (configs, logs) after the run')
    ap.add_argument('--cleanup-only', action='store_true',
                    help='stop servers left by a crashed earlier run, then exit')
    ap.add_argument('--report', nargs='+', metavar='JSON',
                    help='print one table from earlier results files (no runs)')
    a = ap.parse_args()
    if a.systems is None:
        a.systems = ','.join(DEFAULT_SYSTEMS) + (',relay' if a.relay_cmd else '')
    a.systems = [s.strip() for s in a.systems.split(',') if s.strip()]
    a.workloads = [w.strip() for w in a.workloads.split(',') if w.strip()]
    for s in a.systems:
        if s not in SYSTEMS:
            ap.error(f'unknown system {s!r}')
    a.workloads = [x for w in a.workloads for x in ALIASES.get(w, [w])]
    for w in a.workloads:
        if w not in WORKLOADS:
            ap.error(f'unknown workload {w!r}')
    if 'relay' in a.systems and not a.relay_cmd:
        ap.error('system "relay" needs --relay-cmd or RELAY_CMD')
    if a.relay_config:
        if not os.path.isfile(a.relay_config):
            ap.error(f'--relay-config: no such file {a.relay_config!r}')
        a.relay_config = os.path.abspath(a.relay_config)
    if not 1 <= a.repeat <= 10:
        ap.error('--repeat must be 1..10')
    return a


def order(rows):
    wl = list(WORKLOADS)
    sy = ['direct', 'postfix', 'postfix-reuse', 'haraka', 'aiosmtpd']
    return sorted(rows, key=lambda r: (
        wl.index(r['workload']) if r['workload'] in wl else 99,
        sy.index(r['system']) if r['system'] in sy else 50, r['system'],
        str(r['rep'])))


def report(files):
    rows = []
    for k, path in enumerate(files, 1):
        with open(path) as f:
            data = json.load(f)
        reps = {r['rep'] for r in data['rows']}
        for r in data['rows']:
            r['rep'] = str(k) if len(files) > 1 and reps == {1} else (
                f'{k}.{r["rep"]}' if len(files) > 1 else str(r['rep']))
            rows.append(r)
        m = data['meta']
        print(f'{k}: {path}: started {m["started"]}, {m["seconds"]} s, '
              f'downstream={m["downstream"]}, box busy before start '
              f'{m.get("idle_busy_pct_before", "?")}%, {m.get("versions")}')
    derive(rows)
    rows = order(rows)
    print(table(rows))
    print()
    print(summary(rows))
    text, _ = targets(rows)
    if text:
        print()
        print(text)
    if profiles(rows):
        print()
        print(profiles(rows))
    return 0


def main():
    args = parse_args()
    if args.report:
        return report(args.report)
    os.makedirs(WORK_BASE, exist_ok=True)
    cleanup_leftovers()
    if args.cleanup_only:
        return 0
    for tool in ('smtp-source', 'smtp-sink'):
        if not shutil.which(tool):
            sys.exit(f'{tool} not found: run benchmarks/setup.sh (apt-get install postfix)')
    raise_nofile()
    stamp = time.strftime('%Y%m%d-%H%M%S')
    run_dir = os.path.join(WORK_BASE, f'run-{stamp}-{os.getpid()}')
    os.makedirs(run_dir)
    reg = Registry(run_dir)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f'signal {signum}')
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    idle_busy = background_busy()
    if idle_busy > 15:
        log(f'WARNING: the box is already {idle_busy:.0f}% busy (of all '
            f'{os.cpu_count()} cores) before any server starts: numbers will '
            'be lower and noisier than on an idle machine')
    rows = []
    t_all = time.monotonic()
    pki = None
    try:
        if any(WORKLOADS[w].get('tls_down') or WORKLOADS[w].get('tls_up')
               for w in args.workloads):
            if not shutil.which('stunnel'):
                sys.exit('stunnel not found: run benchmarks/setup.sh '
                         '(apt-get install stunnel4)')
            pki = make_pki(os.path.join(run_dir, 'pki'))
        for rep in range(1, args.repeat + 1):
            for wl in args.workloads:
                for system in workload_systems(wl, args.systems):
                    log(f'run {rep}/{args.repeat}: workload {wl} '
                        f'({WORKLOADS[wl]["desc"]}) on {system}')
                    row = one_run(system, wl, rep, args, reg, run_dir, pki)
                    rows.append(row)
                    log(f'  -> {row["status"]} e2e={fmt(row.get("e2e_s"), ".3f")}s '
                        f'accept={fmt(row.get("accept_s"), ".3f")}s '
                        f'rss={fmt((row.get("peak_rss_kb") or 0) / 1024, ".1f")}MB '
                        f'{row["note"].strip()}')
    except KeyboardInterrupt:
        log('interrupted: stopping everything this run started')
    finally:
        reg.stop_all()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            log(f'work dir kept: {run_dir}')
    derive(rows)
    rows = order(rows)
    out = args.out or os.path.join(HERE, 'results', f'{stamp}.json')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = dict(started=stamp, seconds=round(time.monotonic() - t_all, 1),
                relay_name=args.relay_name, relay_config=args.relay_config,
                idle_busy_pct_before=round(idle_busy, 1),
                argv=sys.argv[1:], downstream=args.downstream,
                relay_cmd=args.relay_cmd if 'relay' in args.systems else None,
                versions=versions(), workloads=WORKLOADS)
    with open(out, 'w') as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    print()
    print(f'SMTP relay benchmark {stamp}  downstream={args.downstream}  '
          f'({meta["seconds"]} s, results: {os.path.relpath(out)})')
    print('msgs/s and wall s: until the sink has counted every message '
          '(end to end); accept: until smtp-source got its last reply.')
    print('x direct: wall / wall of direct (iv: p50 e2e latency / direct\'s); '
          'p50, p95 ms (iv): accept/e2e per message; +direct ms: p50 e2e - '
          'direct\'s.')
    print('mem: VmHWM of a one-process relay; peak of the sum of PSS for a '
          'process tree (postfix); v: the same at the plateau with 500 idle '
          'sessions (VmRSS / sum of PSS).')
    print('x pf: ratio to postfix in this run (msgs/s; mem). target: the '
          'performance targets, relay rows only. cpu%: of one core, over the wall '
          'time; other: the rest of the box.')
    print(f'box busy before start: {idle_busy:.0f}% of {os.cpu_count()} cores')
    print('versions: ' + ', '.join(f'{k} {v}' for k, v in meta['versions'].items()))
    print(table(rows))
    print()
    print(summary(rows))
    text, verdicts = targets(rows)
    if text:
        print()
        print(text)
    if profiles(rows):
        print()
        print(profiles(rows))
    failed = [r for r in rows if r['status'] not in ('ok', 'skip')]
    if failed:
        print()
        for r in failed:
            print(f'FAILED: workload {r["workload"]} on {r["system"]} '
                  f'(run {r["rep"]}): {r["note"].strip()}')
        print(f'FAIL: {len(failed)} run(s) failed (every message must reach '
              'the sink): exit status 1')
        return 1
    if 'FAIL' in verdicts:
        print()
        print(f'FAIL: {verdicts.count("FAIL")} performance target(s) '
              'missed: exit status 3')
        return 3
    return 0


def workload_systems(wl, systems):
    """The systems asked for, and the variants the workload adds after
    their base system (postfix-reuse after postfix, relay-x2 after relay)."""
    out = []
    for s in systems:
        out.append(s)
        out += [x for x in WORKLOADS[wl].get('extra_systems', ())
                if x.split('-')[0] == s]
    return out


def raise_nofile():
    """Workload v holds 500 sessions (sockets here and in the relay, which
    inherits this limit): raise the soft limit of open files to the hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as e:
            log(f'cannot raise RLIMIT_NOFILE from {soft}: {e}')
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < 2 * WORKLOADS['v']['sessions'] + 100:
        log(f'WARNING: RLIMIT_NOFILE is {soft}: too low for workload v')


if __name__ == '__main__':
    sys.exit(main())
