"""The codec and the path rules, in memory: no sockets, no processes."""

from __future__ import annotations

import errno
import os

import msgpack
import pytest

import rt
from redoxcap.nsmgr.namespace import split_scheme_path
from redoxcap.schemes.framework import SchemeError
from redoxcap.wire import frames as F
from redoxcap.wire import protocol as P
from rt._paths import to_namespace_path


def test_requests_and_replies_round_trip():
    frame = F.encode_request(P.OPENAT, 99, ["a/b", os.O_RDONLY, 0o644])
    op, tag = F.REQUEST.unpack_from(frame)
    assert (op, tag) == (P.OPENAT, 99)
    assert P.unpack(frame[F.REQUEST.size :]) == ["a/b", 0, 0o644]
    assert F.decode_reply(F.encode_reply(99, P.OK, b"data")) == (99, P.OK, b"data")


@pytest.mark.parametrize("body", [
    b"\xc1",  # never used by msgpack
    b"\x92\x01",  # truncated array
    b"\xd4\x01\x00",  # ext type 1
    msgpack.packb({1: 2}),  # non-string map key
    b"\xa2\xff\xfe",  # str that is not UTF-8
    b"\x01\x02",  # extra data after the value
])
def test_untrusted_bodies_are_protocol_errors(body):
    with pytest.raises(P.ProtocolError) as info:
        P.unpack(body)
    assert info.value.errno == errno.EINVAL


def test_open_flags_equal_linux_and_resolve_bits_are_free():
    assert (rt.O_RDONLY, rt.O_CREAT, rt.O_DIRECTORY, rt.O_NOFOLLOW) == (
        os.O_RDONLY, os.O_CREAT, os.O_DIRECTORY, os.O_NOFOLLOW)
    linux_bits = 0
    for name in dir(os):
        if name.startswith("O_"):
            linux_bits |= getattr(os, name)
    assert rt.O_RESOLVE_BENEATH & linux_bits == 0
    assert rt.O_RESOLVE_IN_ROOT & linux_bits == 0
    assert rt.AT_FDCWD == -100


@pytest.mark.parametrize("name, ok", [
    ("file", True), ("my-scheme.2", True), ("", False), ("a/b", False), ("a:b", False),
    ("a\0b", False), ("ünï", False), ("x" * 256, False), (3, False),
])
def test_scheme_names(name, ok):
    assert P.valid_scheme_name(name) is ok


@pytest.mark.parametrize("path, expected", [
    ("/home/u/f", "/scheme/file/home/u/f"),
    ("/", "/scheme/file/"),
    ("/scheme/tcp/127.0.0.1/80", "/scheme/tcp/127.0.0.1/80"),
    ("/scheme", "/scheme"),
    ("/schemes/x", "/scheme/file/schemes/x"),
    ("tcp:127.0.0.1/80", "/scheme/tcp/127.0.0.1/80"),
    ("file:/a", "/scheme/file/a"),
    ("relative/path", None),
    ("./a:b", None),
])
def test_posix_paths_map_to_namespace_paths(path, expected):
    assert to_namespace_path(path) == expected


@pytest.mark.parametrize("path, expected", [
    ("/scheme/file/a/b", ("file", "a/b")),
    ("/scheme/file", ("file", ".")),
    ("/scheme/file/", ("file", ".")),
    ("/scheme/file//a", ("file", "a")),
    ("/scheme/file/a/", ("file", "a/")),
    ("file:a", ("file", "a")),
])
def test_nsmgr_splits_scheme_paths(path, expected):
    assert split_scheme_path(path) == expected


@pytest.mark.parametrize("path, err", [
    ("/etc/passwd", errno.ENOENT), ("relative", errno.ENOENT),
    ("/scheme/", errno.EINVAL), ("/scheme/a:b/c", errno.EINVAL),
])
def test_nsmgr_rejects_paths_outside_scheme(path, err):
    with pytest.raises(SchemeError) as info:
        split_scheme_path(path)
    assert info.value.errno == err
