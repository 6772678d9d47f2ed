"""``pymta tls dhparam``: new Diffie-Hellman parameters, the image's ``update_postfix_dhparam``.

DHE key exchange (forward secrecy for TLS 1.2 clients without ECDHE) needs DH parameters;
without a file OpenSSL offers no DHE suite at all. The file goes to
``SMTPD_TLS_DH1024_PARAM_FILE`` when that is set (Postfix's parameter name; the "1024" is
historical, 2048 bits are the default and what OpenSSL's default security level asks for),
else to ``<state_dir>/tls/dhparam.pem``, where the server looks when the variable is unset.
Written to a temporary name and renamed, so a running server never reads half a file; a
reload (SIGHUP) or restart serves it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from typing import TextIO

from pymta.config.errors import ConfigError
from pymta.config.model import Config
from pymta.files import replace_file

MIN_BITS = 512       # what the generator accepts; the server itself needs 2048 and up


def dhparam(args: argparse.Namespace, config: Config | None, out: TextIO) -> int:
    """Write the parameters; ``config`` (None when ``--out`` is given) says the default
    place. Prints the file name on ``out``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import dh

    from pymta.servertls import dhparam_path

    if config is not None and args.state_dir:
        config = dataclasses.replace(config, state_dir=args.state_dir)
    bits = args.bits
    if bits < MIN_BITS or bits > 8192:
        raise ConfigError(f"--bits: between {MIN_BITS} and 8192, not {bits}")
    path = args.out or dhparam_path(config) if config is not None else args.out
    print(f"pymta: generating {bits}-bit DH parameters (this can take a while)",
          file=sys.stderr)
    with warnings.catch_warnings():
        # cryptography 51 marks finite-field DH deprecated; Postfix's files still need it
        warnings.simplefilter("ignore")
        params = dh.generate_parameters(generator=2, key_size=bits)
    pem = params.parameter_bytes(serialization.Encoding.PEM,
                                 serialization.ParameterFormat.PKCS3)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        replace_file(path, pem, 0o644)
    except OSError as exc:
        raise ConfigError(f"--out: cannot write {path!r}: {exc.strerror or exc}") from None
    print(path, file=out)
    if bits < 2048:
        print(f"pymta: note: OpenSSL's default security level refuses DH parameters under "
              f"2048 bits; the server will not start with {bits}", file=sys.stderr)
    print("pymta: reload the server (kill -HUP) to use them" if config is not None else
          f"pymta: the server uses them when SMTPD_TLS_DH1024_PARAM_FILE={path} (or when "
          "they are <state dir>/tls/dhparam.pem); reload it (kill -HUP)", file=sys.stderr)
    return 0
