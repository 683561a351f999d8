"""A tiny DNS server for the end-to-end tests (standard library only).

It listens on 127.0.0.1, on a port the kernel picks, over UDP and TCP (a resolver that falls back
to TCP gets the same answers, and "drop" then means a TCP connection that never answers either).
Behaviour is configured per query name:

    stub.a("2.0.0.127.rbl.test", "127.0.0.2")   # A record(s); AAAA and others: NOERROR, no data
    stub.aaaa("host.test", "::1")                # AAAA record(s)
    stub.txt("sel._domainkey.example.test", "v=DKIM1; k=ed25519; p=...")  # TXT record(s)
    stub.nxdomain("name")                        # NXDOMAIN for every type
    stub.servfail("name")                        # SERVFAIL for every type
    stub.drop("name")                            # never answer (the client times out)

A name with no configuration gets NXDOMAIN. Every query received is recorded as (name, type),
name lowercased without the trailing dot, type as text ("A", "AAAA", "PTR", ... or "TYPE<n>"):
`stub.queries`, `stub.names()`, `stub.asked(name, type)`.

As a pytest fixture: `from dnsstub import dns_stub` in a test module, then use `dns_stub`;
`dns_stub.address` is the "127.0.0.1:PORT" string for `[dns] servers`.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading

import pytest

QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
          33: "SRV", 41: "OPT", 255: "ANY"}

NOERROR, SERVFAIL, NXDOMAIN = 0, 2, 3


def _type_name(t: int) -> str:
    return QTYPES.get(t, f"TYPE{t}")


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


def _encode_name(name: str) -> bytes:
    out = b""
    for label in _norm(name).split("."):
        if label:
            b = label.encode("ascii")
            out += bytes([len(b)]) + b
    return out + b"\x00"


def parse_query(packet: bytes):
    """(id, flags, qname, qtype, qclass, end offset of the question) of a DNS query."""
    if len(packet) < 12:
        raise ValueError("short packet")
    qid, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if qdcount < 1:
        raise ValueError("no question")
    labels = []
    i = 12
    while True:
        if i >= len(packet):
            raise ValueError("truncated name")
        n = packet[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(packet[i + 1:i + 1 + n].decode("ascii", errors="replace"))
        i += 1 + n
    if i + 4 > len(packet):
        raise ValueError("truncated question")
    qtype, qclass = struct.unpack("!HH", packet[i:i + 4])
    return qid, flags, ".".join(labels), qtype, qclass, i + 4


def build_response(packet: bytes, rcode: int, answers=()) -> bytes:
    """A response to `packet` with one question echoed and `answers` = [(type, rdata bytes)]."""
    qid, flags, qname, qtype, qclass, qend = parse_query(packet)
    opcode = flags & 0x7800
    rd = flags & 0x0100
    rflags = 0x8000 | opcode | 0x0400 | rd | 0x0080 | (rcode & 0x0F)
    header = struct.pack("!HHHHHH", qid, rflags, 1, len(answers), 0, 0)
    question = packet[12:qend]
    body = b""
    for rtype, rdata in answers:
        # Name: pointer to the question name at offset 12.
        body += struct.pack("!HHHIH", 0xC00C, rtype, 1, 60, len(rdata)) + rdata
    return header + question + body


class DnsStub:
    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self._lock = threading.Lock()
        self._rules: dict[str, tuple] = {}
        self.queries: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((host, 0))
        self.port = self.udp.getsockname()[1]
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.tcp.bind((host, self.port))
            self.tcp.listen(16)
        except OSError:
            self.tcp.close()
            self.tcp = None
        self._held: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- configuration ---------------------------------------------------------------------
    def a(self, name: str, *ips: str) -> "DnsStub":
        with self._lock:
            rule = self._rules.get(_norm(name))
            recs = dict(rule[1]) if rule and rule[0] == "records" else {}
            recs["A"] = [ipaddress.IPv4Address(ip).packed for ip in ips]
            self._rules[_norm(name)] = ("records", recs)
        return self

    def aaaa(self, name: str, *ips: str) -> "DnsStub":
        with self._lock:
            rule = self._rules.get(_norm(name))
            recs = dict(rule[1]) if rule and rule[0] == "records" else {}
            recs["AAAA"] = [ipaddress.IPv6Address(ip).packed for ip in ips]
            self._rules[_norm(name)] = ("records", recs)
        return self

    def txt(self, name: str, *texts: str | bytes) -> "DnsStub":
        """One TXT record per text, each cut into character-strings of at most 255 bytes (a
        DKIM RSA key does not fit in one)."""
        rdatas = []
        for text in texts:
            raw = text.encode() if isinstance(text, str) else text
            parts = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
            rdatas.append(b"".join(bytes([len(p)]) + p for p in parts))
        with self._lock:
            rule = self._rules.get(_norm(name))
            recs = dict(rule[1]) if rule and rule[0] == "records" else {}
            recs["TXT"] = rdatas
            self._rules[_norm(name)] = ("records", recs)
        return self

    def nxdomain(self, name: str) -> "DnsStub":
        with self._lock:
            self._rules[_norm(name)] = ("nxdomain",)
        return self

    def servfail(self, name: str) -> "DnsStub":
        with self._lock:
            self._rules[_norm(name)] = ("servfail",)
        return self

    def drop(self, name: str) -> "DnsStub":
        with self._lock:
            self._rules[_norm(name)] = ("drop",)
        return self

    # -- what was asked ----------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return [n for n, _ in self.queries]

    def asked(self, name: str, qtype: str | None = None) -> bool:
        name = _norm(name)
        with self._lock:
            return any(n == name and (qtype is None or t == qtype) for n, t in self.queries)

    def clear(self) -> None:
        with self._lock:
            self.queries.clear()

    # -- serving -----------------------------------------------------------------------------
    def answer(self, packet: bytes) -> bytes | None:
        """The response to one query packet, or None to stay silent."""
        try:
            _, _, qname, qtype, _, _ = parse_query(packet)
        except ValueError:
            return None
        name = _norm(qname)
        tname = _type_name(qtype)
        with self._lock:
            self.queries.append((name, tname))
            rule = self._rules.get(name)
        if rule is None or rule[0] == "nxdomain":
            return build_response(packet, NXDOMAIN)
        if rule[0] == "servfail":
            return build_response(packet, SERVFAIL)
        if rule[0] == "drop":
            return None
        recs = rule[1]
        rdatas = recs.get(tname, []) if tname in ("A", "AAAA", "TXT") else []
        return build_response(packet, NOERROR, [(qtype, r) for r in rdatas])

    def start(self) -> "DnsStub":
        t = threading.Thread(target=self._serve_udp, name="dnsstub-udp", daemon=True)
        t.start()
        self._threads.append(t)
        if self.tcp is not None:
            t = threading.Thread(target=self._serve_tcp, name="dnsstub-tcp", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _serve_udp(self) -> None:
        self.udp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                packet, peer = self.udp.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            resp = self.answer(packet)
            if resp is not None:
                try:
                    self.udp.sendto(resp, peer)
                except OSError:
                    pass

    def _serve_tcp(self) -> None:
        self.tcp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        try:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65535)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 2:
                    n = struct.unpack("!H", buf[:2])[0]
                    if len(buf) < 2 + n:
                        break
                    packet, buf = buf[2:2 + n], buf[2 + n:]
                    resp = self.answer(packet)
                    if resp is not None:
                        conn.sendall(struct.pack("!H", len(resp)) + resp)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        for s in (self.udp, self.tcp):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        for t in self._threads:
            t.join(2)


@pytest.fixture
def dns_stub():
    """A running DnsStub on 127.0.0.1; stopped after the test."""
    stub = DnsStub().start()
    yield stub
    stub.stop()


def query_txt(server: str, name: str, timeout: float = 2.0) -> list[bytes]:
    """The TXT records of `name` from the DNS server at "host:port", each character-string
    joined (for dkimpy's and pyspf's lookups in the tests, which must not reach the system's
    resolvers). [] for NXDOMAIN or no data; OSError on SERVFAIL or no answer."""
    host, port = server.rsplit(":", 1)
    qid = 0x5151
    query = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + _encode_name(name) + struct.pack("!HH", 16, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(query, (host, int(port)))
        resp = s.recv(65535)
    flags, qd, an = struct.unpack("!HHH", resp[2:8])
    rcode = flags & 0x0F
    if rcode == NXDOMAIN:
        return []
    if rcode != NOERROR:
        raise OSError(f"DNS rcode {rcode} for {name}")
    i = 12
    for _ in range(qd):  # skip the question
        while resp[i] != 0:
            i += 1 + resp[i]
        i += 5
    out = []
    for _ in range(an):
        i += 2  # name: a pointer in build_response's answers
        rtype, _, _, rdlen = struct.unpack("!HHIH", resp[i:i + 10])
        i += 10
        rdata, i = resp[i:i + rdlen], i + rdlen
        if rtype != 16:
            continue
        text, j = b"", 0
        while j < len(rdata):
            n = rdata[j]
            text += rdata[j + 1:j + 1 + n]
            j += 1 + n
        out.append(text)
    return out


# --------------------------------------------------------------------------------------------
# MX records (outbound delivery tests, SPEC C1). Added for test_outbound/test_bounce/test_alias:
# a subclass, so DnsStub and its current users are unchanged.
# --------------------------------------------------------------------------------------------

MX_TYPE = 15


class MxDnsStub(DnsStub):
    """DnsStub that also answers MX queries:

        stub.mx("remote.example", (10, "mx1.remote.example"), (20, "mx2.remote.example"))
        stub.null_mx("nomail.example")        # RFC 7505: MX 0 .

    MX records live beside the A/AAAA records of the same name (stub.a() on the same name keeps
    them, and vice versa); the answer lists them in the order given. A name with MX records but
    no A record answers A/AAAA queries with NOERROR and no data. nxdomain/servfail/drop on a name
    replace its MX records too.
    """

    def mx(self, name: str, *records) -> "MxDnsStub":
        rdatas = []
        for pref, host in records:
            host = _norm(host)
            rdatas.append(struct.pack("!H", int(pref)) + (_encode_name(host) if host else b"\x00"))
        with self._lock:
            rule = self._rules.get(_norm(name))
            recs = dict(rule[1]) if rule and rule[0] == "records" else {}
            recs["MX"] = rdatas
            self._rules[_norm(name)] = ("records", recs)
        return self

    def null_mx(self, name: str) -> "MxDnsStub":
        return self.mx(name, (0, "."))

    def answer(self, packet: bytes) -> bytes | None:
        try:
            _, _, qname, qtype, _, _ = parse_query(packet)
        except ValueError:
            return None
        if qtype != MX_TYPE:
            return super().answer(packet)
        name = _norm(qname)
        with self._lock:
            self.queries.append((name, "MX"))
            rule = self._rules.get(name)
        if rule is None or rule[0] == "nxdomain":
            return build_response(packet, NXDOMAIN)
        if rule[0] == "servfail":
            return build_response(packet, SERVFAIL)
        if rule[0] == "drop":
            return None
        return build_response(packet, NOERROR, [(MX_TYPE, r) for r in rule[1].get("MX", [])])


@pytest.fixture
def mx_dns_stub():
    """A running MxDnsStub on 127.0.0.1; stopped after the test."""
    stub = MxDnsStub().start()
    yield stub
    stub.stop()
