"""What every part of the harness shares: where things are, the bench
addresses, the errors, reading /proc, the registry of the processes a run
starts (stopped by PID, also after a crash), and small socket helpers."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

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
