"""Configs: Python files that assign names, then --key=value flags parsed as Python literals.

    cfg = config.load(Config, ["config/tiny.py", "--batch_size=4"])

A later file overrides an earlier one and flags override files. Every key must be a field of the dataclass and
have its type (an int is accepted for a float); anything else is a one-line ValueError naming the nearest key.
choices {key: allowed values} and positive (keys that must be > 0) are checked on the result.
"""
import ast
import dataclasses
import difflib
import os


def load(cls, args, choices=None, positive=()):
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {}

    def put(key, value, where):
        if key not in types:
            near = difflib.get_close_matches(key, types, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ValueError(f"unknown config key '{key}' in {where}{hint}")
        want = types[key]
        if want is float and type(value) is int:
            value = float(value)
        if type(value) is not want:
            raise ValueError(f"config key '{key}' in {where} must be {want.__name__}, "
                             f"got {type(value).__name__} {value!r}")
        values[key] = value

    for arg in args:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"flag '{arg}' needs a value: --{key}=VALUE")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word is a string
            put(key, value, f"flag {arg}")
        else:
            if not os.path.isfile(arg):
                raise ValueError(f"config file '{arg}' not found; pass a path such as config/tiny.py")
            scope = {"__file__": arg}
            exec(compile(open(arg).read(), arg, "exec"), scope)  # the user's own config file, as in nanoGPT
            for key, value in scope.items():
                if not key.startswith("__") and not callable(value) and type(value).__name__ != "module":
                    put(key, value, arg)
    cfg = cls(**values)
    for key, allowed in (choices or {}).items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"config key '{key}' must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
    for key in positive:
        if not getattr(cfg, key) > 0:
            raise ValueError(f"config key '{key}' must be > 0, got {getattr(cfg, key)!r}")
    return cfg
