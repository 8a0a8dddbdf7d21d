"""TLS for the benchmark's workloads vi and vii (standard library + openssl
and stunnel from the system).

* ``make_pki(dir)``: a self-made CA and a server certificate for
  127.0.0.1/localhost signed by it (openssl), once per harness run.
* ``Stunnel``: one stunnel process in the foreground, implicit TLS, either a
  server (TLS in, plain out: in front of smtp-sink, so that the sink stays as
  cheap for every system) or a client (plain in, TLS out: smtp-source through
  it to a system's implicit-TLS listener).

Every process is recorded in the harness's Registry and stopped by PID.
"""
import os
import socket
import subprocess
import time

HOST = '127.0.0.1'


def make_pki(d):
    """CA and server certificate under d; returns dict(ca=, cert=, key=)."""
    os.makedirs(d, exist_ok=True)
    p = {k: os.path.join(d, f'{k}.pem') for k in
         ('ca', 'ca_key', 'cert', 'key')}
    csr = os.path.join(d, 'server.csr')
    ext = os.path.join(d, 'server.ext')
    with open(ext, 'w') as f:
        f.write('subjectAltName = IP:127.0.0.1, DNS:localhost\n'
                'basicConstraints = CA:FALSE\n'
                'extendedKeyUsage = serverAuth\n')

    def ossl(*a):
        subprocess.run(['openssl', *a], check=True, capture_output=True,
                       timeout=60)
    ossl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
         '-subj', '/CN=smtpbench CA', '-keyout', p['ca_key'], '-out', p['ca'])
    ossl('req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=127.0.0.1',
         '-keyout', p['key'], '-out', csr)
    ossl('x509', '-req', '-in', csr, '-CA', p['ca'], '-CAkey', p['ca_key'],
         '-CAcreateserial', '-days', '2', '-extfile', ext, '-out', p['cert'])
    return p


def wait_listening(port, deadline, proc_alive=lambda: True):
    """True once something accepts TCP connections on HOST:port."""
    while time.monotonic() < deadline and proc_alive():
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Stunnel:
    """stunnel in the foreground: accept on ``accept_port``, connect to
    ``connect_port``; ``client=False``: TLS in (with pki's certificate),
    plain out; ``client=True``: plain in, TLS out (no verification: the
    systems' listeners are what is measured, not the client's checks)."""

    def __init__(self, accept_port, connect_port, client, pki, reg, run_dir):
        self.reg = reg
        role = 'client' if client else 'server'
        conf = os.path.join(run_dir, f'stunnel-{role}-{accept_port}.conf')
        lines = ['foreground = yes', 'syslog = no', 'debug = 3',
                 f'output = {conf[:-5]}.log',
                 'socket = l:TCP_NODELAY=1', 'socket = r:TCP_NODELAY=1',
                 f'[{role}]', f'accept = {HOST}:{accept_port}',
                 f'connect = {HOST}:{connect_port}']
        if client:
            lines.append('client = yes')
        else:
            lines += [f'cert = {pki["cert"]}', f'key = {pki["key"]}']
        with open(conf, 'w') as f:
            f.write('\n'.join(lines) + '\n')
        cmd = ['stunnel', conf]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.entry = reg.add(self.pid, 'popen', cmd)
        if not wait_listening(accept_port, time.monotonic() + 15,
                              lambda: self.proc.poll() is None):
            self.stop()
            raise RuntimeError(f'stunnel ({role}) did not listen on '
                               f'{accept_port}: see {conf[:-5]}.log')

    def cpu_ticks(self):
        try:
            with open(f'/proc/{self.pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
            return int(fields[11]) + int(fields[12])
        except OSError:
            return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.reg.remove(self.entry)
