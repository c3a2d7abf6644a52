"""Where diffopt keeps what it changed: on the object it changed.

Every change is a :class:`Layer` recorded in the changed object's ``_diffopt_layers`` list, the way peft keeps
``base_layer`` and accelerate ``_old_forward`` on the module they wrap. So the record follows the object:

* two pipelines that share a UNet see one record on it, whichever of them optimized it;
* ``copy.deepcopy`` copies the record with the object, and the copy's layers point at the copy's own weights,
  blocks and schedulers (a layer holds references to parts of its owner, never a closure over them);
* ``pickle`` carries it too, except a compiled call and an :class:`UnpicklableHook`, which say to ``restore``
  first.

A layer that replaces a method on an instance (:class:`InstanceHook`) installs *itself* as that attribute (or,
where dynamo must see one function for many instances, a method bound to the instance that it recognizes, see
``InstanceHook.holds_this``), so undo can find it and unlink exactly it, also when something else (an offload hook,
another layer) wrapped it afterwards.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable, List, Optional, Tuple

logger = logging.getLogger(__name__)

#: The instance attribute holding an object's layers; removed when its last layer goes.
ATTR = "_diffopt_layers"
_ORDER = itertools.count()


def mark() -> int:
    """A stamp below every layer attached from now on: ``undo_all(owners, since=mark())`` takes off only those."""
    return next(_ORDER)


class Layer:
    """One change to one object. ``undo(owner)`` puts the object back and must be safe to retry after it fails."""

    transform = "?"  # the option that made it: "attention", "compile", ...
    detail = ""  # what changed, for the report

    def undo(self, owner: Any) -> None:
        raise NotImplementedError


def attach(owner: Any, layer: Layer) -> Layer:
    """Record ``layer`` on ``owner``; stamps it so undo can run across objects in reverse order of application."""
    layer.order = next(_ORDER)
    vars(owner).setdefault(ATTR, []).append(layer)
    return layer


def layers_of(owner: Any) -> List[Layer]:
    return list(vars(owner).get(ATTR, ()))


def detach(owner: Any, layer: Layer) -> None:
    layers = vars(owner).get(ATTR, [])
    if layer in layers:
        layers.remove(layer)
    if not layers:
        vars(owner).pop(ATTR, None)


def undo_all(owners: Iterable[Any], since: int = -1) -> Tuple[List[Tuple[Any, Layer]], List[BaseException]]:
    """Undo every layer on ``owners`` (those attached after ``since``), newest first across all of them. A layer whose undo raises stays recorded
    (restore can be retried); the others are undone all the same. Returns what was undone and the errors."""
    seen, stacked = set(), []
    for owner in owners:
        if id(owner) in seen:
            continue
        seen.add(id(owner))
        stacked += [(layer.order, owner, layer) for layer in layers_of(owner) if layer.order > since]
    done, errors = [], []
    for _, owner, layer in sorted(stacked, key=lambda item: item[0], reverse=True):
        try:
            layer.undo(owner)
        except Exception as error:  # keep undoing the rest; the caller re-raises
            errors.append(error)
            continue
        detach(owner, layer)
        done.append((owner, layer))
    return done, errors


class InstanceHook(Layer):
    """Replaces ``owner.<name>`` on the instance (never its class) with this layer, which runs :meth:`around`
    with whatever was there before (the class's method, or an earlier instance attribute such as another hook).

    ``__wrapped__`` points at that, so ``inspect.signature(owner.name)`` is unchanged: pipelines ask
    ``scheduler.step`` whether it takes ``eta``, and ``retrieve_timesteps`` asks ``set_timesteps`` for ``device``.
    """

    def __init__(self, owner: Any, name: str):
        self.owner, self.name = owner, name
        self.had_own = name in vars(owner)
        self.previous = vars(owner).get(name)
        # The class's function, called with the owner: read here once so that a traced call stays a plain call.
        self.function = None if self.had_own else getattr(type(owner), name)

    def install(self) -> "InstanceHook":
        setattr(self.owner, self.name, self)
        return attach(self.owner, self)

    def inner(self, *args, **kwargs):
        if self.had_own:
            return self.previous(*args, **kwargs)
        return self.function(self.owner, *args, **kwargs)

    @property
    def __wrapped__(self):
        return self.previous if self.had_own else self.function.__get__(self.owner)

    def __call__(self, *args, **kwargs):
        return self.around(*args, **kwargs)

    def around(self, *args, **kwargs):  # subclasses run their work around self.inner
        return self.inner(*args, **kwargs)

    def holds_this(self, value: Any) -> bool:
        """Whether ``value`` (the attribute, or what a wrapper above keeps) is what :meth:`install` put there."""
        return value is self

    def undo(self, owner: Any) -> None:
        current = vars(owner).get(self.name)
        if self.holds_this(current):
            if self.had_own:
                setattr(owner, self.name, self.previous)
            else:
                vars(owner).pop(self.name, None)
            return
        # Wrapped again since: unlink this layer from the chain, keep what wraps it.
        for holder, field in _chain(owner, self.name):
            if self.holds_this(getattr(holder, field, None)):
                if field == "previous" and not self.had_own:  # the hook above now calls the class's method
                    holder.had_own, holder.previous, holder.function = False, None, self.function
                else:
                    setattr(holder, field, self.previous if self.had_own else self.function.__get__(owner))
                return
        logger.warning(
            "diffopt: %s.%s was replaced after optimize by something diffopt cannot see into; left as it is",
            type(owner).__name__, self.name,
        )


class UnpicklableHook(InstanceHook):
    """An :class:`InstanceHook` that pickle cannot carry (compiled code, or a function dynamo must see as one for
    many instances): pickling raises a ``TypeError`` that says what and to restore first. ``copy.deepcopy`` copies
    it with its owner, sharing the attributes named in ``shared`` (those the copy can use as they are)."""

    shared: Tuple[str, ...] = ()
    #: What cannot be pickled, for the error: "compiled blocks", ...
    unpicklable = "this change"

    def __reduce_ex__(self, protocol):
        raise TypeError(f"diffopt: {self.unpicklable} cannot be pickled; call diffopt.restore(pipe) before pickling "
                        "(and diffopt.optimize(pipe) again after loading)")  # fmt: skip

    def __deepcopy__(self, memo):
        from copy import deepcopy

        twin = object.__new__(type(self))
        memo[id(self)] = twin
        for key, value in vars(self).items():
            setattr(twin, key, value if key in self.shared else deepcopy(value, memo))
        return twin


def _chain(owner: Any, name: str) -> List[Tuple[Any, str]]:
    """Where a wrapper above ours may hold it: another diffopt hook's ``previous``, or accelerate's ``_old_forward``
    (``add_hook_to_module`` keeps the replaced forward there)."""
    holders = [(layer, "previous") for layer in layers_of(owner) if isinstance(layer, InstanceHook) and layer.name == name]
    if name == "forward" and "_old_forward" in vars(owner):
        holders.append((owner, "_old_forward"))
    return holders


def find(owner: Any, kind: type) -> Optional[Layer]:
    """The newest layer of class ``kind`` on ``owner``."""
    for layer in reversed(layers_of(owner)):
        if isinstance(layer, kind):
            return layer
    return None


class Applied:
    """What one ``apply_*`` call did: ``detail`` for the report, and :meth:`undo` to take off exactly the layers it
    attached (for code that applies one transform by hand; optimize/restore work from the objects themselves)."""

    def __init__(self, detail: str, since: int, *objects: Any):
        self.detail, self.since = detail, since
        self.owners = [m for obj in objects for m in (obj.modules() if hasattr(obj, "modules") else [obj])]

    def undo(self) -> None:
        _, errors = undo_all(self.owners, self.since)
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        return f"Applied({self.detail!r})"
