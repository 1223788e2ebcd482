"""Encoders built by a Python function of the user's: ``taemi extract --encoders MODULE:FUNCTION``.

The built-in profiles (:mod:`taemi.extract.profiles`) cover the packaged offline models
and the paper's backbones. Anything else, a model of one's own or the small numpy
stand-ins of the test suite, is plugged in by naming a function that takes no
arguments and returns a :class:`taemi.extract.pipeline.Encoders`. ``MODULE`` must be
importable by the process that extracts (on ``PYTHONPATH`` or installed); with
``--distributed`` that is every worker, on every node.

Nothing is hidden by this: the store's provenance records the ``name`` and
``settings`` each encoder reports, exactly as for a profile, so features of a custom
encoder can never be mixed into a store of another.
"""

from __future__ import annotations

import importlib
import re

from taemi.extract.pipeline import Encoders

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def encoders_from_factory(spec: str) -> Encoders:
    """Call the function named by ``spec`` (``"package.module:function"``) and check that it
    returned an :class:`Encoders`."""
    if not isinstance(spec, str) or _SPEC.match(spec) is None:
        raise ValueError(
            f"--encoders {spec!r}: expected MODULE:FUNCTION, e.g. mypkg.models:make_encoders"
        )
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"--encoders {spec}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
            "it must be installed or on PYTHONPATH in every process that extracts"
        ) from e
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ValueError(  # noqa: TRY004 (a CLI error)
            f"--encoders {spec}: module {module.__file__} has no function {func_name!r}"
        )
    enc = factory()
    if not isinstance(enc, Encoders):
        raise ValueError(  # noqa: TRY004 (the CLI reports ValueErrors as clean errors)
            f"--encoders {spec}: {func_name}() returned a {type(enc).__name__}, "
            "not a taemi.extract.pipeline.Encoders"
        )
    return enc
