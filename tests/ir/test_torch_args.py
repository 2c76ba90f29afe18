"""The ``st.torch_call`` argument spec: decoded once into a function of the operands."""

from __future__ import annotations

import json

import pytest
import torch

from stitch_ir.interpreter import InterpreterError, torch_args_decoder


def test_top_level_operands_fill_a_template():
    """A convolution_backward's spec (operands first, then constants): each call gets its own
    argument list with the operands in place; repeated calls do not see each other's values."""
    spec = json.dumps({"args": [{"operand": 0}, {"operand": 2}, [16], [1, 1], False, 1,
                                [True, False, True]], "kwargs": {"groups": 1}})
    decode = torch_args_decoder(spec)
    a, kw = decode(["g", "x", "w"])
    assert a == ["g", "w", [16], [1, 1], False, 1, [True, False, True]] and kw == {"groups": 1}
    a[0] = "changed"
    kw["groups"] = 2
    assert decode([1, 2, 3]) == ([1, 3, [16], [1, 1], False, 1, [True, False, True]],
                                 {"groups": 1})


def test_nested_operands_and_torch_constants():
    """Operands inside lists, tuples and keyword arguments; dtypes, devices, layouts and memory
    formats decoded to torch objects; a bad entry is an error naming it."""
    spec = json.dumps({"args": [[{"operand": 0}, {"operand": 1}], {"dtype": "float16"},
                                {"tuple": [1, {"operand": 2}]}, {"device": "cpu"}],
                       "kwargs": {"out": {"operand": 0}, "layout": {"layout": "strided"},
                                  "memory_format": {"memory_format": "channels_last"}}})
    a, kw = torch_args_decoder(spec)(["p", "q", "r"])
    assert a == [["p", "q"], torch.float16, (1, "r"), torch.device("cpu")]
    assert kw == {"out": "p", "layout": torch.strided, "memory_format": torch.channels_last}
    with pytest.raises(InterpreterError, match="bad torch_call argument"):
        torch_args_decoder(json.dumps({"args": [{"what": 1}]}))
