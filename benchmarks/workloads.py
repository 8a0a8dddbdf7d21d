"""The workloads (what load, how much, within what time) and one measured
run of one system on one workload: the sink, the system, the warm-up, the
load (smtp-source, the latency client, the idle sessions), the drain, and
the row of figures."""

import errno
import math
import os
import re
import selectors
import signal
import smtplib
import socket
import statistics
import subprocess
import threading
import time

from common import (CLK_TCK, HELO, HOST, KB, MB, RCPT, SENDER, BenchError,
                    Skip, cpu_busy, free_port, make_message, self_cpu, udp_out)
from measure import PySpy, Sampler
from systems import (DovecotSink, PostfixRelay, Sink, start_system,
                     system_label)
from tls import Stunnel

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
        relay, port, src_lmtp = start_system(
            system, args, lmtp, tls, (sink_port, listen_port, sink_tls_port,
                                      source_tls_port),
            relay_sink_port, reg, run_dir, tunnels)
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
