"""Which pinauth errors a route can raise, read from the code itself (for test_openapi_errors).

A small static analysis: from a route's endpoint and dependencies, follow every call into
pinauth's own code, resolving `services.auth.start_login(...)` and `self._oauth.exchange(...)`
through type hints (parameters, dataclass fields, `self.x = param` in `__init__`, return
annotations), and collect the exception classes each `raise` names. An exception raised
inside `try` and caught by one of its handlers counts only if the handler re-raises it.
Calls the analysis cannot resolve (third-party code, untyped locals) add nothing: the one
third-party raiser that matters is the database pool (db.py turns its timeout into
DatabaseUnavailable), so opening a session counts as raising that.
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FunctionType, ModuleType
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker

from pinauth.errors import DatabaseUnavailable

Errors = frozenset[type[BaseException]]

# Objects outside pinauth whose use raises a pinauth error (see the module docstring).
EDGE_RAISERS: dict[type, Errors] = {async_sessionmaker: frozenset({DatabaseUnavailable})}


@dataclass(frozen=True)
class Instance:
    """An expression's value is an instance of `cls`."""

    cls: type


def _ours(obj: object) -> bool:
    return (getattr(obj, "__module__", None) or "").startswith("pinauth")


def _strip(hint: Any) -> Any:
    """`Annotated[X, …]`, `X | None` and `Awaitable`-free return hints down to X's class."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _strip(args[0]) if len(args) == 1 else None
    origin = typing.get_origin(hint)
    if isinstance(origin, type):
        return origin
    return hint if isinstance(hint, type) else None


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:  # a hint naming something only imported under TYPE_CHECKING
        return {}


class RaiseAnalysis:
    def __init__(self) -> None:
        self._memo: dict[Any, Errors] = {}
        # Every pinauth function each analysed function calls (for `reaches`).
        self.calls: dict[Any, set[Any]] = {}

    # --- what a callable raises ------------------------------------------------------

    def raised_by(self, func: Callable[..., Any]) -> Errors:
        func = inspect.unwrap(getattr(func, "__func__", func))
        if isinstance(func, type):
            init = func.__dict__.get("__init__")
            return self.raised_by(init) if init is not None and _ours(init) else frozenset()
        if not isinstance(func, FunctionType) or not _ours(func):
            return frozenset()
        if func in self._memo:
            return self._memo[func]
        self._memo[func] = frozenset()  # recursion ends here
        tree = _parse(func)
        if tree is None:
            return frozenset()
        node = tree.body[0]
        assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        scope = _Scope(self, func)
        self.calls[func] = scope.called
        result = frozenset(scope.raises(node.body, reraise=frozenset()))
        self._memo[func] = result
        return result

    def reaches(self, func: Callable[..., Any], target: Callable[..., Any]) -> bool:
        """Whether calling `func` can call `target` (after analysing `func`)."""
        self.raised_by(func)
        seen: set[Any] = set()
        todo = [inspect.unwrap(getattr(func, "__func__", func))]
        while todo:
            current = todo.pop()
            if current is target:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(self.calls.get(current, ()))
        return False

    @functools.cache  # noqa: B019 - one analysis per test, and classes live forever
    def attributes(self, cls: type) -> dict[str, Any]:
        """Types of `cls`'s instance attributes: class hints, then `self.x = …` in __init__."""
        types: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            if not _ours(klass):
                continue
            for name, hint in _hints(klass).items():
                if (stripped := _strip(hint)) is not None:
                    types[name] = Instance(stripped)
            init = klass.__dict__.get("__init__")
            if isinstance(init, FunctionType) and (tree := _parse(init)) is not None:
                scope = _Scope(self, init)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Assign | ast.AnnAssign):
                        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                        for target in targets:
                            if (
                                isinstance(target, ast.Attribute)
                                and isinstance(target.value, ast.Name)
                                and target.value.id == "self"
                                and node.value is not None
                            ):
                                value = scope.value_of(node.value)
                                if value is not None:
                                    types[target.attr] = value
        return types


class _Scope:
    """One function body: its names' types, and the calls and raises in it."""

    def __init__(self, analysis: RaiseAnalysis, func: FunctionType) -> None:
        self.analysis = analysis
        self.func = func
        self.globals = func.__globals__
        self.locals: dict[str, Any] = {}
        self.called: set[Any] = set()
        owner = self._owner()
        for name, hint in _hints(func).items():
            if name != "return" and (stripped := _strip(hint)) is not None:
                self.locals[name] = Instance(stripped)
        params = list(inspect.signature(func).parameters)
        if owner is not None and params and params[0] == "self":
            self.locals["self"] = Instance(owner)
        for node in ast.walk(_parse(func) or ast.Module(body=[], type_ignores=[])):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                hint = self.value_of(node.annotation)
                if isinstance(_strip(hint), type):
                    self.locals[node.target.id] = Instance(_strip(hint))
            elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if isinstance(target, ast.Name) and target.id not in self.locals:
                    value = self.value_of(node.value)
                    if value is not None:
                        self.locals[target.id] = value

    def _owner(self) -> type | None:
        parts = self.func.__qualname__.split(".")
        if len(parts) < 2 or "<locals>" in parts:
            return None
        obj: Any = sys.modules[self.func.__module__]
        for part in parts[:-1]:
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, type) else None

    # --- types ---------------------------------------------------------------------

    def value_of(self, expr: ast.expr) -> Any:
        """What `expr` is: an Instance, or the module/class/function it names (or None)."""
        if isinstance(expr, ast.Await):
            return self.value_of(expr.value)
        if isinstance(expr, ast.Name):
            if expr.id in self.locals:
                return self.locals[expr.id]
            return self.globals.get(expr.id, getattr(builtins, expr.id, None))
        if isinstance(expr, ast.Attribute):
            base = self.value_of(expr.value)
            if isinstance(base, ModuleType | type):
                return getattr(base, expr.attr, None)
            if isinstance(base, Instance):
                member = inspect.getattr_static(base.cls, expr.attr, None)
                if isinstance(member, property) and member.fget is not None:
                    return _returned(member.fget)
                if member is not None and callable(member):
                    return member
                return self.analysis.attributes(base.cls).get(expr.attr)
            return None
        if isinstance(expr, ast.Call):
            callee = self.value_of(expr.func)
            if isinstance(callee, type):
                return Instance(callee)
            if isinstance(callee, FunctionType | staticmethod | classmethod):
                return _returned(callee)
            return None
        return None

    # --- raises --------------------------------------------------------------------

    def raises(self, nodes: Iterable[ast.AST], reraise: Errors) -> set[type[BaseException]]:
        found: set[type[BaseException]] = set()
        for node in nodes:
            found |= self._visit(node, reraise)
        return found

    def _visit(self, node: ast.AST, reraise: Errors) -> set[type[BaseException]]:
        if isinstance(node, ast.Try | ast.TryStar):
            return self._try(node, reraise)
        found: set[type[BaseException]] = set()
        if isinstance(node, ast.Raise):
            if node.exc is None:
                return set(reraise)
            found |= self._raised(node.exc, reraise)
        elif isinstance(node, ast.Call):
            found |= self._called(node)
        for child in ast.iter_child_nodes(node):
            found |= self._visit(child, reraise)
        return found

    def _raised(self, exc: ast.expr, reraise: Errors) -> set[type[BaseException]]:
        if isinstance(exc, ast.Name) and exc.id not in self.globals and reraise:
            return set(reraise)  # `except X as e: … raise e`
        value = self.value_of(exc)
        if isinstance(value, type) and issubclass(value, BaseException):
            return {value}
        if isinstance(value, Instance) and issubclass(value.cls, BaseException):
            return {value.cls}
        return set()

    def _called(self, call: ast.Call) -> set[type[BaseException]]:
        callee = self.value_of(call.func)
        if isinstance(callee, Instance):
            for edge, errors in EDGE_RAISERS.items():
                if issubclass(callee.cls, edge):
                    return set(errors)
            return set()
        if isinstance(callee, type) and issubclass(callee, BaseException):
            return set()  # constructing an exception raises nothing
        if callee is not None and callable(callee):
            self.called.add(inspect.unwrap(getattr(callee, "__func__", callee)))
            return set(self.analysis.raised_by(callee))
        return set()

    def _try(self, node: ast.Try | ast.TryStar, reraise: Errors) -> set[type[BaseException]]:
        escaping = self.raises(node.body, reraise)
        found: set[type[BaseException]] = set()
        for handler in node.handlers:
            caught_types = self._handler_types(handler.type)
            caught = {e for e in escaping if issubclass(e, caught_types)}
            escaping -= caught
            found |= self.raises(handler.body, frozenset(caught))
        found |= escaping
        found |= self.raises(node.orelse, reraise)
        found |= self.raises(node.finalbody, reraise)
        return found

    def _handler_types(self, expr: ast.expr | None) -> tuple[type[BaseException], ...]:
        if expr is None:
            return (BaseException,)
        items = expr.elts if isinstance(expr, ast.Tuple) else [expr]
        types = []
        for item in items:
            value = self.value_of(item)
            if isinstance(value, type) and issubclass(value, BaseException):
                types.append(value)
        return tuple(types)


def _returned(func: Any) -> Any:
    hint = _hints(inspect.unwrap(getattr(func, "__func__", func))).get("return")
    stripped = _strip(hint) if hint is not None else None
    return Instance(stripped) if stripped is not None else None


def _parse(func: FunctionType) -> ast.Module | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(func)))
    except OSError:  # generated code (a dataclass's __init__)
        return None
