"""The systems under test and the sinks: how each one is set up, started
and stopped (direct, postfix, postfix-reuse, haraka, aiosmtpd, the relay
command, two relay processes on one port), the sinks (smtp-sink, Dovecot)
and the stunnel hops of the TLS workloads."""

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

from common import (AIOSMTPD_PY, HARAKA_BIN, HERE, HOST, PEERS, BenchError,
                    Skip, alive, proc_stat, render, stop_entry, tree,
                    wait_banner)
from tls import Stunnel, wait_listening

SYSTEMS = ['direct', 'postfix', 'haraka', 'aiosmtpd', 'relay']
DEFAULT_SYSTEMS = ['direct', 'postfix', 'aiosmtpd']   # haraka: opt-in (npm)


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
        self.dir = tempfile.mkdtemp(prefix=f'dovecot-{port}-', dir=run_dir)
        os.chmod(self.dir, 0o755)  # its services drop root
        # the daemon keeps its stdout: a file, not a pipe to wait on
        with open(os.path.join(self.dir, 'start.log'), 'wb') as out:
            r = subprocess.run(['sh', self.SCRIPT, self.dir, str(port)],
                               stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=60)
        pidfile = os.path.join(self.dir, 'run', 'master.pid')
        self.pid = None
        # the master may have created its pid file but not written it yet
        deadline = time.monotonic() + (10 if r.returncode == 0 else 0)
        while True:
            try:
                with open(pidfile) as f:
                    self.pid = int(f.read().strip() or 0) or None
            except OSError:
                pass
            if self.pid or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if self.pid:
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
        d = tempfile.mkdtemp(prefix=f'postfix-{listen_port}-', dir=run_dir)
        os.chmod(d, 0o755)  # its daemons run as the postfix user
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
        # a port can come back in a later run of the same harness run
        d = tempfile.mkdtemp(prefix=f'{name}-{listen_port}{tag}-', dir=run_dir)
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


# -------------------------------------------------------------- start ----

def system_label(system, args):
    if system == 'relay':
        return args.relay_name
    if system == 'relay-x2':
        return f'{args.relay_name} x2'
    return system


def workload_systems(extra_systems, systems):
    """The systems asked for, and the variants a workload adds after their
    base system (postfix-reuse after postfix, relay-x2 after relay)."""
    out = []
    for s in systems:
        out.append(s)
        out += [x for x in extra_systems if x.split('-')[0] == s]
    return out


def start_system(system, args, lmtp, tls, ports, relay_sink_port, reg,
                 run_dir, tunnels):
    """Start `system` in front of the sink on relay_sink_port (the sink's
    stunnel with a TLS downstream); ports: (sink, listen, sink TLS, source
    TLS). Returns (the relay or None for direct, the port the load connects
    to, whether the load speaks LMTP). The stunnel clients it starts are
    appended to `tunnels` (the caller stops them); a relay that started is
    stopped again if what follows it fails."""
    sink_port, listen_port, sink_tls_port, source_tls_port = ports
    pki = tls and tls['pki']
    if system == 'direct':
        port = sink_port
        if tls:
            # the TLS hop without a relay: stunnel client -> stunnel
            # server -> sink
            tunnels.append(Stunnel(source_tls_port, sink_tls_port, True,
                                   pki, reg, run_dir))
            port = source_tls_port
        return None, port, lmtp
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
    port = listen_port
    try:
        if tls and tls['up']:
            tunnels.append(Stunnel(source_tls_port, listen_port, True,
                                   pki, reg, run_dir))
            port = source_tls_port
            # through the tunnel, the system's greeting proves the chain
            wait_banner(port, time.monotonic() + 30)
    except BaseException:
        relay.stop()
        raise
    return relay, port, False
