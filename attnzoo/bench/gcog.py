"""gCOG (generic COG, Ito et al. 2024): a configurable multimodal question-answering generator with three
out-of-distribution splits, seeded and offline; registered as the ``gcog`` task.

A scene holds objects (a shape, a colour and a cell of a ``grid x grid`` image), each object three
tokens; a task is a tree in prefix notation over leaf queries about the scene:

* boolean leaves ``exist_shape s``, ``exist_color c``, ``exist_pair s c``;
* value leaves ``color_of s`` (the colour of the object of shape s) and ``shape_of c``;
* nodes ``and a b`` / ``or a b`` (boolean children) and ``if cond then else``.

The input is ``[CLS] scene [SEP] task`` (padded; ``mask`` marks real tokens), the answer one class:
false, true, a colour or a shape. Every object has its own shape and colour, so each query has
one answer. Splits (``split``): ``distractor`` (test scenes hold ``distractors_test`` distractor
objects, training scenes at most ``distractors_train``), ``systematic`` (a seeded subset of task
compositions, the prefix sequence of node and leaf types, is held out of training and is all the
test holds), ``productive`` (test trees are exactly one level deeper than the deepest training tree)
and ``iid``.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnzoo.bench.tasks import TASKS, Task, TaskData, _check_n_seed, _positive
from attnzoo.registry import Reduction, register

__all__ = ["GCOG", "evaluate", "signature"]

SPECIALS = ("<pad>", "<cls>", "<sep>")
OPS = {"and": 2, "or": 2, "if": 3}
BOOL_LEAVES = ("exist_shape", "exist_color", "exist_pair")
VALUE_LEAVES = ("color_of", "shape_of")
LEAVES = BOOL_LEAVES + VALUE_LEAVES
SPLITS = ("distractor", "systematic", "productive", "iid")

Tree = tuple  # ("and", a, b) | ("if", c, a, b) | ("exist_shape", s) | ("exist_pair", s, c) | ...


def signature(tree: Tree) -> str:
    """The composition of a tree: its node and leaf types in prefix order (arguments left out)."""
    if tree[0] in OPS:
        return tree[0] + "(" + ",".join(signature(t) for t in tree[1:]) + ")"
    return tree[0]


def depth(tree: Tree) -> int:
    return 1 + max(depth(t) for t in tree[1:]) if tree[0] in OPS else 0


def _leaves(tree: Tree) -> list[Tree]:
    return [x for t in tree[1:] for x in _leaves(t)] if tree[0] in OPS else [tree]


def evaluate(tree: Tree, scene: list[tuple[int, int, int]]) -> tuple[str, int]:
    """The answer ``(kind, value)`` of ``tree`` on ``scene`` (objects ``(shape, color, cell)``):
    ``("bool", 0/1)``, ``("color", c)`` or ``("shape", s)``."""
    op = tree[0]
    if op == "and":
        return "bool", int(evaluate(tree[1], scene)[1] and evaluate(tree[2], scene)[1])
    if op == "or":
        return "bool", int(evaluate(tree[1], scene)[1] or evaluate(tree[2], scene)[1])
    if op == "if":
        return evaluate(tree[2] if evaluate(tree[1], scene)[1] else tree[3], scene)
    if op == "exist_shape":
        return "bool", int(any(o[0] == tree[1] for o in scene))
    if op == "exist_color":
        return "bool", int(any(o[1] == tree[1] for o in scene))
    if op == "exist_pair":
        return "bool", int(any(o[0] == tree[1] and o[1] == tree[2] for o in scene))
    if op == "color_of":
        return "color", next(o[1] for o in scene if o[0] == tree[1])
    return "shape", next(o[0] for o in scene if o[1] == tree[1])


@dataclass
class GCOG(Task):
    """The gCOG generator (see the module docstring). ``train_depth``: the deepest training tree
    (productive test trees have ``train_depth + 1``); ``holdout_fraction``: the share of compositions
    held out by the systematic split."""

    split: str = "distractor"
    train_depth: int = 1
    distractors_train: int = 2
    distractors_test: int = 8
    n_shapes: int = 32
    n_colors: int = 32
    grid: int = 10
    holdout_fraction: float = 0.3

    name: ClassVar[str] = "gcog"
    kind: ClassVar[str] = "classify"
    causal: ClassVar[bool] = False
    label_keys: ClassVar[tuple[str, ...]] = ("split", "train_depth")

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {self.split!r}")
        _positive("train_depth", self.train_depth, 0)
        _positive("distractors_train", self.distractors_train, 0)
        _positive("distractors_test", self.distractors_test, 0)
        _positive("grid", self.grid)
        if self.split == "distractor" and self.distractors_test <= self.distractors_train:
            raise ValueError(f"distractors_test: must exceed distractors_train={self.distractors_train} for the "
                             f"distractor split, got {self.distractors_test}")
        need = self.max_objects + self.max_leaves
        for name in ("n_shapes", "n_colors"):
            if _positive(name, getattr(self, name)) < need:
                raise ValueError(f"{name}: every object and absent attribute needs its own value: at least "
                                 f"{need} for these depths and distractors, got {getattr(self, name)}")
        if self.grid * self.grid < self.max_objects:
            raise ValueError(f"grid: {self.grid}x{self.grid} cells cannot hold {self.max_objects} objects")
        if not 0.0 < float(self.holdout_fraction) < 1.0:
            raise ValueError(f"holdout_fraction: expected a fraction in (0, 1), got {self.holdout_fraction!r}")

    # Sizes -----------------------------------------------------------------------------------
    @property
    def max_depth(self) -> int:
        return self.train_depth + (1 if self.split == "productive" else 0)

    @property
    def max_leaves(self) -> int:
        return 3 ** self.max_depth

    @property
    def max_objects(self) -> int:
        return self.max_leaves + max(self.distractors_train, self.distractors_test)

    @property
    def vocab(self) -> list[str]:
        return [*SPECIALS, *OPS, *LEAVES, *(f"shape{i}" for i in range(self.n_shapes)),
                *(f"color{i}" for i in range(self.n_colors)), *(f"cell{i}" for i in range(self.grid ** 2))]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def seq_len(self) -> int:  # type: ignore[override]
        return 2 + 3 * self.max_objects + 3 * self.max_leaves + (3 ** self.max_depth - 1) // 2

    @property
    def n_outputs(self) -> int:
        return 2 + self.n_colors + self.n_shapes

    # Generation ------------------------------------------------------------------------------
    def held_out(self, tree: Tree) -> bool:
        """Whether the systematic split holds this composition out of training (a fixed hash of it)."""
        return zlib.crc32(signature(tree).encode()) % 1000 < 1000 * float(self.holdout_fraction)

    def _skeleton(self, rng: random.Random, d: int, want: str) -> Tree:
        """A tree of exactly depth ``d`` whose leaves carry no arguments yet."""
        if d == 0:
            return (rng.choice(BOOL_LEAVES if want == "bool" else LEAVES),)
        op = rng.choice(("and", "or") if want == "bool" else ("and", "or", "if"))
        kids = ["bool"] * 2 if op != "if" else ["bool", "any", "any"]
        full = rng.randrange(len(kids))
        return (op, *(self._skeleton(rng, d - 1 if i == full else rng.randint(0, d - 1), k)
                      for i, k in enumerate(kids)))

    def _example(self, rng: random.Random, part: str) -> tuple[Tree, list[tuple[int, int, int]]]:
        for _ in range(10_000):
            if part == "test" and self.split == "productive":
                d = self.train_depth + 1
            else:
                d = rng.randint(0, self.train_depth)
            skel = self._skeleton(rng, d, "any")
            if self.split == "systematic" and self.held_out(skel) != (part == "test"):
                continue
            return self._fill(rng, skel, part)
        raise ValueError(f"gcog: found no {part} composition for split={self.split!r}; change holdout_fraction")

    def _fill(self, rng: random.Random, skel: Tree, part: str) -> tuple[Tree, list[tuple[int, int, int]]]:
        shapes = rng.sample(range(self.n_shapes), self.n_shapes)
        colors = rng.sample(range(self.n_colors), self.n_colors)
        objects: list[tuple[int, int]] = []

        def new_object() -> tuple[int, int]:
            objects.append((shapes.pop(), colors.pop()))
            return objects[-1]

        def fill(t: Tree) -> Tree:
            if t[0] in OPS:
                return (t[0], *(fill(c) for c in t[1:]))
            present = t[0] in VALUE_LEAVES or rng.random() < 0.5
            if present:
                o = new_object() if not objects or rng.random() < 0.7 else rng.choice(objects)
                s, c = o
            else:
                s, c = shapes.pop(), colors.pop()  # absent from the scene: never given to an object
            if t[0] in ("exist_shape", "color_of"):
                return (t[0], s)
            if t[0] in ("exist_color", "shape_of"):
                return (t[0], c)
            if not present and rng.random() < 0.5 and objects:  # a pair whose shape exists with another colour
                return (t[0], rng.choice(objects)[0], c)
            return (t[0], s, c)

        tree = fill(skel)
        n_dis = self.distractors_test if part == "test" and self.split == "distractor" else \
            rng.randint(0, self.distractors_train)
        for _ in range(n_dis):
            new_object()
        cells = rng.sample(range(self.grid ** 2), len(objects))
        scene = [(s, c, cell) for (s, c), cell in zip(objects, cells)]
        rng.shuffle(scene)
        return tree, scene

    def examples(self, n: int, seed: int, part: str = "train") -> list[tuple[Tree, list[tuple[int, int, int]]]]:
        """``n`` (tree, scene) pairs of the ``part`` (``"train"`` or ``"test"``) distribution."""
        _check_n_seed(n, seed)
        if part not in ("train", "test"):
            raise ValueError(f"part: expected 'train' or 'test', got {part!r}")
        rng = random.Random(f"gcog:{seed}:{part}")
        return [self._example(rng, part) for _ in range(n)]

    def encode(self, items: list[tuple[Tree, list[tuple[int, int, int]]]]) -> TaskData:
        ids = {t: i for i, t in enumerate(self.vocab)}
        inputs = torch.zeros(len(items), self.seq_len, dtype=torch.long)
        mask = torch.zeros(len(items), self.seq_len, dtype=torch.bool)
        labels = torch.empty(len(items), dtype=torch.long)
        for i, (tree, scene) in enumerate(items):
            toks = ["<cls>"]
            for s, c, cell in scene:
                toks += [f"shape{s}", f"color{c}", f"cell{cell}"]
            toks.append("<sep>")
            toks += self._prefix(tree)
            inputs[i, :len(toks)] = torch.tensor([ids[t] for t in toks])
            mask[i, :len(toks)] = True
            labels[i] = self.answer_class(*evaluate(tree, scene))
        return TaskData(inputs, labels, mask)

    def _prefix(self, tree: Tree) -> list[str]:
        if tree[0] in OPS:
            return [tree[0], *(x for t in tree[1:] for x in self._prefix(t))]
        args = {"exist_shape": ("shape",), "color_of": ("shape",), "exist_color": ("color",),
                "shape_of": ("color",), "exist_pair": ("shape", "color")}[tree[0]]
        return [tree[0], *(f"{kind}{v}" for kind, v in zip(args, tree[1:]))]

    def answer_class(self, kind: str, value: int) -> int:
        return value if kind == "bool" else 2 + value if kind == "color" else 2 + self.n_colors + value

    def generate(self, n: int, seed: int) -> TaskData:
        """``n`` training-distribution examples."""
        return self.encode(self.examples(n, seed, "train"))

    def generate_test(self, n: int, seed: int) -> TaskData:
        """``n`` examples of the split's out-of-distribution test set."""
        return self.encode(self.examples(n, seed, "test"))

    def splits(self, n_train: int, n_test: int, seed: int = 0) -> tuple[TaskData, TaskData]:
        """Training data and the split's OOD test data (seeds ``seed`` and ``seed + 1``)."""
        return self.generate(n_train, seed), self.generate_test(n_test, seed + 1)

    def decode(self, row: torch.Tensor) -> tuple[Tree, list[tuple[int, int, int]]]:
        """The (tree, scene) of an encoded input row (the inverse of :meth:`encode`)."""
        words = [self.vocab[int(t)] for t in row if int(t) != 0]
        sep = words.index("<sep>")
        scene = [(int(words[j][5:]), int(words[j + 1][5:]), int(words[j + 2][4:])) for j in range(1, sep, 3)]
        rest = iter(words[sep + 1:])

        def parse() -> Tree:
            w = next(rest)
            if w in OPS:
                return (w, *(parse() for _ in range(OPS[w])))
            n_args = 2 if w == "exist_pair" else 1
            return (w, *(int(next(rest).removeprefix("shape").removeprefix("color")) for _ in range(n_args)))

        return parse(), scene

    def oracle(self, data: TaskData) -> torch.Tensor:
        """Logits ``[E, n_outputs]`` of the exact solver (decode the tokens, evaluate the tree)."""
        out = torch.zeros(len(data), self.n_outputs)
        for i in range(len(data)):
            tree, scene = self.decode(data.inputs[i])
            out[i, self.answer_class(*evaluate(tree, scene))] = 1.0
        return out


TASKS[GCOG.name] = GCOG


def _oracle_is_exact() -> tuple[torch.Tensor, torch.Tensor]:
    scores = []
    for split in SPLITS:
        task = GCOG(split=split)
        for data in task.splits(48, 48, seed=2):
            scores.append(task.score(task.oracle(data), data).mean())
    got = torch.stack(scores)
    return got, torch.ones_like(got)


def _seeded() -> tuple[torch.Tensor, torch.Tensor]:
    task = GCOG(split="systematic")
    a, b = task.splits(16, 16, seed=4), task.splits(16, 16, seed=4)
    return (torch.cat([a[0].inputs.flatten(), a[1].inputs.flatten(), a[1].labels]).double(),
            torch.cat([b[0].inputs.flatten(), b[1].inputs.flatten(), b[1].labels]).double())


@register(
    "gcog", family="benchmark", type="task", priority=3, papers=("gCOG",), supports=(), complexity="n/a",
    backends=(), reference="an exact solver (decode the scene and the task tree, evaluate it) scores 1.0",
    reference_kwargs={}, reductions=(
        Reduction("oracle", "the exact solver scores 100% on the train and test sets of every split", _oracle_is_exact),
        Reduction("seeded", "the same seed gives the same examples", _seeded),
    ),
    summary="gCOG: QA over synthetic scenes with task trees; distractor, systematic and productive OOD splits",
)
def gcog(split: str = "distractor", train_depth: int = 1, distractors_train: int = 2, distractors_test: int = 8,
         n_shapes: int = 32, n_colors: int = 32, grid: int = 10, holdout_fraction: float = 0.3) -> GCOG:
    """The gCOG task (see :class:`attnzoo.bench.gcog.GCOG`)."""
    return GCOG(split=split, train_depth=train_depth, distractors_train=distractors_train,
                distractors_test=distractors_test, n_shapes=n_shapes, n_colors=n_colors, grid=grid,
                holdout_fraction=holdout_fraction)
