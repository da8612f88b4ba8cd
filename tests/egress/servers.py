"""The egress tests' servers, inside the test network's server namespace.

    servers.py DIR CERT KEY

Serves, until killed:
- plain HTTP on 198.51.100.10:80, 198.51.100.11:80 and [2001:db8::10]:80,
  answering "hello from ADDRESS HOST PATH";
- HTTPS (CERT, KEY) on 198.51.100.10:443 and :8443, the same answer, and the
  files under DIR/www (a git repository served the dumb way, a package index);
- bait listeners on 169.254.169.254:80 and 198.51.100.66:80 that append every
  connection they see to DIR/bait.log;
- a lax HTTP server on 198.51.100.10:8080 that answers every request a
  connection carries, `Connection: close` or not (as some servers do), and
  appends each request line, Host and body length to DIR/lax.log.

Writes DIR/servers.ready when every socket is bound.
"""

import http.server
import os
import socket
import socketserver
import ssl
import sys
import threading

DIR, CERT, KEY = sys.argv[1:4]
WWW = os.path.join(DIR, "www")


class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **kw):
        super().__init__(*a, directory=WWW, **kw)

    def do_GET(self):
        if self.path.startswith("/files/"):
            self.path = self.path[len("/files"):]
            return super().do_GET()
        body = f"hello from {self.server.server_address[0]} {self.headers.get('Host')} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        # HTTPServer's own looks its address up in DNS (getfqdn), which has
        # no answer in the test network.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class Bait(socketserver.BaseRequestHandler):
    def handle(self):
        with open(os.path.join(DIR, "bait.log"), "a") as f:
            f.write(f"{self.server.server_address} from {self.client_address}\n")


class Lax(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            line = self.rfile.readline(65536)
            if not line:
                return
            headers = {}
            while True:
                h = self.rfile.readline(65536)
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            n = 0
            if headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    n += size
                    self.rfile.read(size + 2)
                    if size == 0:
                        break
            else:
                n = int(headers.get("content-length", "0"))
                self.rfile.read(n)
            entry = f"{line.decode('latin-1').strip()} host={headers.get('host')} body={n}"
            with open(os.path.join(DIR, "lax.log"), "a") as f:
                f.write(entry + "\n")
            answer = f"lax: {entry}\n".encode()
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer)
            self.wfile.flush()


class Server6(Server):
    address_family = socket.AF_INET6


servers = [Server6(("2001:db8::10", 80), Handler)]
lax = socketserver.ThreadingTCPServer(("198.51.100.10", 8080), Lax)
lax.daemon_threads = True
servers.append(lax)
for addr in ("198.51.100.10", "198.51.100.11"):
    servers.append(Server((addr, 80), Handler))
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT, KEY)
for port in (443, 8443):
    s = Server(("198.51.100.10", port), Handler)
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
    servers.append(s)
for addr in ("169.254.169.254", "198.51.100.66"):
    b = socketserver.ThreadingTCPServer((addr, 80), Bait)
    b.daemon_threads = True
    servers.append(b)
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
open(os.path.join(DIR, "servers.ready"), "w").close()
threading.Event().wait()
