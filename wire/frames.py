"""The four frame kinds, each a small frozen dataclass that encodes and decodes itself.

Sans I/O: nothing here touches a socket. Every frame starts with a fixed
binary header, so that the kernel router can route it without decoding the
msgpack body, which it never touches (a frame's `body` stays raw bytes until
someone who is allowed to read it calls `value()`/`args()`):

    client -> router   Request        <BI       op, tag                      + body
                                      (op | SERVING: + <Q the router's id of the request
                                      the sender, a scheme daemon, is serving)
    router -> client   Reply          <IB       tag, status                  + body
    router -> scheme   SchemeRequest  <QQiIIBB  req_id, handle, pid, uid, gid, op, nrefs
                                      + nrefs x <Q (for each fd relayed with the request:
                                        its handle number if it is a capability of this
                                        same scheme, FOREIGN_REF for another scheme's,
                                        else NO_REF: not a capability)           + body
    scheme -> router   SchemeReply    <QB       req_id, status               + body
                                      (status NEW_HANDLE: + <QI handle, fdflags before body;
                                      NEW_HANDLE_KEPT: + <QI handle, fdflags + <II nfds,
                                      size + the handle's kept state (its first nfds fds and
                                      size bytes, as a KEEP's) before body: one frame, not two)
    scheme -> router   Keep           <QB       req_id, KEEP + <QI handle, nfds   + body
                                      (the state to keep for handle across a restart of the
                                      daemon: the first nfds fds and the body; nfds 0 and an
                                      empty body forget it; req_id the request that changed
                                      it, whose reply fails if it cannot be kept. Status
                                      KEEP_MORE: the first fds and body bytes of a state
                                      too large for one frame; more frames follow)

All integers are little-endian. Capabilities travel as fds in SCM_RIGHTS
ancillary data next to the frame, never inside it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from redoxcap.wire.protocol import (
    KEEP,
    KEEP_MORE,
    NEW_HANDLE,
    NEW_HANDLE_KEPT,
    NO_REF,
    ProtocolError,
    pack,
    unpack,
)

REQUEST = struct.Struct("<BI")
REPLY = struct.Struct("<IB")
SREQUEST = struct.Struct("<QQiIIIBB")
SREPLY = struct.Struct("<QB")
NEW_HANDLE_HDR = struct.Struct("<QI")
SERVING_ID = struct.Struct("<Q")
SERVING = 0x80  # a bit of a Request's op: the frame says which request its sender serves
KEEP_HDR = struct.Struct("<QI")
KEPT_HDR = struct.Struct("<II")  # a NEW_HANDLE_KEPT's state: nfds, body size
REF = struct.Struct("<Q")

Body = bytes | memoryview


@dataclass(frozen=True, slots=True)
class Request:
    """A client's request on one capability: op, the tag the reply echoes, the arguments.

    `serving` is set when the sender is a scheme daemon making this request to serve
    one of its own (nsmgr forwarding a client's open): the router's id of that one.
    The router checks the claim and passes the original caller on to the scheme.
    """

    op: int
    tag: int
    body: Body
    serving: int | None = None

    @classmethod
    def of(cls, op: int, tag: int, args: list | tuple = (), serving: int | None = None) -> Request:
        return cls(op, tag, pack(list(args)), serving)

    @classmethod
    def decode(cls, data: bytes) -> Request:
        """Split a frame; ProtocolError if it is shorter than its header."""
        if len(data) < REQUEST.size:
            raise ProtocolError("short request")
        op, tag = REQUEST.unpack_from(data)
        if not op & SERVING:
            return cls(op, tag, memoryview(data)[REQUEST.size :])
        if len(data) < REQUEST.size + SERVING_ID.size:
            raise ProtocolError("short request")
        (serving,) = SERVING_ID.unpack_from(data, REQUEST.size)
        return cls(op & ~SERVING, tag, memoryview(data)[REQUEST.size + SERVING_ID.size :], serving)

    @staticmethod
    def tag_of(data: bytes) -> int:
        """The tag of a request frame, however malformed the rest (0 if there is none)."""
        return REQUEST.unpack_from(data)[1] if len(data) >= REQUEST.size else 0

    def encode(self) -> bytes:
        if self.serving is None:
            return REQUEST.pack(self.op, self.tag) + bytes(self.body)
        return REQUEST.pack(self.op | SERVING, self.tag) + SERVING_ID.pack(self.serving) + bytes(self.body)

    def args(self) -> Any:
        """The decoded arguments (ProtocolError for a malformed body)."""
        return unpack(self.body)


@dataclass(frozen=True, slots=True)
class Reply:
    """The router's answer to a client: the request's tag, a status, one value."""

    tag: int
    status: int
    body: Body

    @classmethod
    def of(cls, tag: int, status: int, value: Any) -> Reply:
        return cls(tag, status, pack(value))

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        if len(data) < REPLY.size:
            raise ProtocolError("short reply")
        tag, status = REPLY.unpack_from(data)
        return cls(tag, status, memoryview(data)[REPLY.size :])

    @staticmethod
    def tag_of(data: bytes) -> int | None:
        """The tag of a reply frame without decoding the rest (None if too short)."""
        return REPLY.unpack_from(data)[0] if len(data) >= REPLY.size else None

    def encode(self) -> bytes:
        return REPLY.pack(self.tag, self.status) + bytes(self.body)

    def value(self) -> Any:
        return unpack(self.body)


@dataclass(frozen=True, slots=True)
class SchemeRequest:
    """A request as the router forwards it to a scheme.

    Attributes:
        req_id: the router's id for it; the reply carries it back.
        handle: the handle the capability names.
        pid, uid, gid: the sender, as Linux told the router (SO_PASSCRED).
        op: the operation.
        refs: for each fd relayed with it, the handle it is in this scheme, FOREIGN_REF
            (a capability of another scheme) or NO_REF (not a capability).
        body: the arguments, undecoded.
        account: the router account the request is charged to (for a request a
            daemon makes for a client, the client's): schemes serve accounts in
            turn, so that one client's many requests do not queue up another's.
    """

    req_id: int
    handle: int
    pid: int
    uid: int
    gid: int
    op: int
    refs: tuple[int, ...]
    body: Body
    account: int = 0

    @classmethod
    def decode(cls, data: bytes) -> SchemeRequest:
        if len(data) < SREQUEST.size:
            raise ProtocolError("short scheme request")
        req_id, handle, pid, uid, gid, account, op, nrefs = SREQUEST.unpack_from(data)
        end = SREQUEST.size + REF.size * nrefs
        if len(data) < end:
            raise ProtocolError("scheme request shorter than its references")
        refs = tuple(REF.unpack_from(data, SREQUEST.size + REF.size * i)[0] for i in range(nrefs))
        return cls(req_id, handle, pid, uid, gid, op, refs, memoryview(data)[end:], account)

    def encode(self) -> bytes:
        header = SREQUEST.pack(self.req_id, self.handle, self.pid, self.uid, self.gid,
                               self.account, self.op, len(self.refs))
        return b"".join([header, *(REF.pack(r) for r in self.refs), self.body])

    def args(self) -> Any:
        return unpack(self.body)


@dataclass(frozen=True, slots=True)
class SchemeReply:
    """A scheme's answer: to req_id, a status and one value; with NEW_HANDLE, the handle
    the router makes a capability for, and the fd flags it is to show (GETFL); with
    NEW_HANDLE_KEPT, also that handle's state for the router to keep (`kept`), the
    first `kept.nfds` of the fds sent with the frame."""

    req_id: int
    status: int
    body: Body
    handle: int = 0
    fdflags: int = 0
    kept: Keep | None = None

    @classmethod
    def of(cls, req_id: int, status: int, value: Any) -> SchemeReply:
        return cls(req_id, status, pack(value))

    @classmethod
    def new_handle(cls, req_id: int, handle: int, fdflags: int, value: Any = None) -> SchemeReply:
        return cls(req_id, NEW_HANDLE, pack(value), handle, fdflags)

    def keeping(self, nfds: int, state: Body) -> SchemeReply:
        """This NEW_HANDLE carrying its handle's kept state: nfds fds (sent first) and state."""
        return SchemeReply(self.req_id, NEW_HANDLE_KEPT, self.body, self.handle, self.fdflags,
                           Keep(self.handle, nfds, state, self.req_id))

    @classmethod
    def decode(cls, data: bytes) -> SchemeReply:
        if len(data) < SREPLY.size:
            raise ProtocolError("short scheme reply")
        req_id, status = SREPLY.unpack_from(data)
        if status != NEW_HANDLE and status != NEW_HANDLE_KEPT:
            return cls(req_id, status, memoryview(data)[SREPLY.size :])
        if len(data) < SREPLY.size + NEW_HANDLE_HDR.size:
            raise ProtocolError("NEW_HANDLE reply without a handle")
        handle, fdflags = NEW_HANDLE_HDR.unpack_from(data, SREPLY.size)
        start, kept = SREPLY.size + NEW_HANDLE_HDR.size, None
        if status == NEW_HANDLE_KEPT:
            kept, start = Keep.carried(data, start, req_id, handle)
        return cls(req_id, status, memoryview(data)[start:], handle, fdflags, kept)

    @staticmethod
    def req_id_of(data: bytes) -> int | None:
        return SREPLY.unpack_from(data)[0] if len(data) >= SREPLY.size else None

    @staticmethod
    def status_of(data: bytes) -> int | None:
        return SREPLY.unpack_from(data)[1] if len(data) >= SREPLY.size else None

    def encode(self) -> bytes:
        header = SREPLY.pack(self.req_id, self.status)
        if self.status == NEW_HANDLE:
            header += NEW_HANDLE_HDR.pack(self.handle, self.fdflags)
        elif self.status == NEW_HANDLE_KEPT and self.kept is not None:
            kept = self.kept
            return b"".join([header, NEW_HANDLE_HDR.pack(self.handle, self.fdflags),
                             KEPT_HDR.pack(kept.nfds, len(kept.body)), kept.body, self.body])
        return header + bytes(self.body)

    def value(self) -> Any:
        return unpack(self.body)


@dataclass(frozen=True, slots=True)
class Keep:
    """A scheme's state for one of its handles, for the router to keep while the handle
    lives and hand back (RESTORE) to the scheme's next daemon after a crash.

    A state with more fds than one message carries (MAX_FDS), or a body larger than a
    frame, goes as KEEP_MORE frames (`more=True`) and a last KEEP frame: the fds and the
    body bytes of all of them, in order, are the state.

    Attributes:
        handle: the handle number.
        nfds: how many of the fds sent with the frame are the state (host fds...).
        body: the rest of the state, opaque to the router; empty with nfds 0: forget it.
        req_id: the request whose handling changed the state (0: none); if the router
            cannot keep it, that request's reply becomes ERR.
        more: a KEEP_MORE frame (its fds begin the state; the last frame is a KEEP).
    """

    handle: int
    nfds: int
    body: Body
    req_id: int = 0
    more: bool = False

    @classmethod
    def of(cls, handle: int, nfds: int, value: Any, req_id: int = 0) -> Keep:
        return cls(handle, nfds, pack(value), req_id)

    @classmethod
    def decode(cls, data: bytes) -> Keep:
        """From a frame whose SREPLY header says KEEP or KEEP_MORE."""
        start = SREPLY.size
        if len(data) < start + KEEP_HDR.size:
            raise ProtocolError("short KEEP frame")
        req_id, status = SREPLY.unpack_from(data)
        handle, nfds = KEEP_HDR.unpack_from(data, start)
        return cls(handle, nfds, memoryview(data)[start + KEEP_HDR.size :], req_id, status == KEEP_MORE)

    @classmethod
    def carried(cls, data: bytes, start: int, req_id: int, handle: int) -> tuple[Keep, int]:
        """The state a NEW_HANDLE_KEPT reply carries for its handle at start (after the
        NEW_HANDLE header), and where the reply's own body begins.

        Raises:
            ProtocolError: the frame is shorter than the state's header or its size says.
        """
        if len(data) < start + KEPT_HDR.size:
            raise ProtocolError("NEW_HANDLE_KEPT without its state's header")
        nfds, size = KEPT_HDR.unpack_from(data, start)
        start += KEPT_HDR.size
        if len(data) < start + size:
            raise ProtocolError("NEW_HANDLE_KEPT shorter than its state")
        return cls(handle, nfds, memoryview(data)[start : start + size], req_id), start + size

    def encode(self) -> bytes:
        return (SREPLY.pack(self.req_id, KEEP_MORE if self.more else KEEP)
                + KEEP_HDR.pack(self.handle, self.nfds) + bytes(self.body))

    def value(self) -> Any:
        return unpack(self.body)


def encode_request(op: int, tag: int, args: list[Any] | tuple[Any, ...],
                   serving: int | None = None) -> bytes:
    """A client request frame."""
    return Request.of(op, tag, args, serving).encode()


def encode_reply(tag: int, status: int, value: Any) -> bytes:
    """A reply frame as the router sends it to a client."""
    return Reply.of(tag, status, value).encode()


def decode_reply(data: bytes) -> tuple[int, int, Any]:
    """Split a reply frame into (tag, status, value)."""
    reply = Reply.decode(data)
    return reply.tag, reply.status, reply.value()


__all__ = [
    "KEEP_HDR",
    "KEPT_HDR",
    "NEW_HANDLE_HDR",
    "NO_REF",
    "REF",
    "REPLY",
    "REQUEST",
    "SREPLY",
    "SREQUEST",
    "Keep",
    "Reply",
    "Request",
    "SchemeReply",
    "SchemeRequest",
    "decode_reply",
    "encode_reply",
    "encode_request",
]
