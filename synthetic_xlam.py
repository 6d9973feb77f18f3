"""Offline generator of function-calling rows in the exact xLAM format, deterministic from a seed.

Tool names are composed as verb x domain object x qualifier (`get_weather_forecast`, `convert_currency`,
`get_stock_price_history`, ...). Every parameter comes from one shared vocabulary (city, date, limit, currency, ...),
so a model can learn one generic skill: copy the argument values that the query states. Tools are used with a
Zipf-like frequency (distinct counts, so the ranking by use is well defined); rows are single calls, several calls of
the same tool, or calls of several tools; one generic `search` tool is used more than any other.

Rows: `{"id": int, "query": str, "tools": json list of tool dicts, "answers": json list of {"name", "arguments"}}`.
The catalog (names, ranks, query templates) comes from a catalog seed that stays fixed by default; the row seed only
changes the values, the mix and the order of the rows, so rank r names the same tool in every corpus.
The tables it composes from (value pools, parameters, verbs, qualifiers, domain objects, phrasings) are data in
`synthetic_tables.py`.

    python synthetic_xlam.py --output data/synthetic_xlam.json --seed 0
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from tqdm import tqdm

from common import CliParser, UserError, atomic_write_json, positive_int, run_cli, setup_logging
from synthetic_tables import (
    AIRLINE_CODES, CITIES, COMPANY_PREFIXES, COMPANY_SUFFIXES, DATE_SPANS, DISTRACTOR_CHOICES, DOMAIN_OBJECTS,
    DOMAIN_WORDS, EMAIL_DOMAINS, EXPRESSION_FORMS, FIRST_DAY, FIRST_NAMES, FIRST_PERSON_OPENERS, KEYWORDS,
    LAST_NAMES, MULTI_CALL_LINKS, NUM_DAYS, OPENERS, ORDERED_PAIRS, PARAMS, PLACE_WORDS, PLAYLIST_MOODS,
    QUALIFIERS, QUARTER_HOURS, ROW_CONNECTORS, SCOPES, SEARCH_ACTIONS, SEARCH_DESCRIPTION, SEARCH_OBJECT,
    STREET_SUFFIXES, STREETS, TEAM_MASCOTS, TEXTS, TITLE_ADJECTIVES, TITLE_NOUNS, TLDS, UPPER, VERBS, VIN_CHARS,
    DomainObject, ParamSpec, Qualifier,
)

logger = logging.getLogger(__name__)

SEARCH_TOOL = "search"
MIN_SINGLE_TOOL_ROWS = 60
ZIPF_MASS = 2000
SEARCH_SHARE_OF_TOP = 1.25
MULTI_CALL_SHARE = 0.12
MULTI_TOOL_SHARE = 0.05
MULTI_SIZES = (2, 2, 3)  # calls of a same-tool row, tools of a multi-tool row
TEMPLATES_PER_TOOL = 6
MAX_RESAMPLES = 200
CATALOG_SEED = 0
BASE_NUM_TOOLS = 400  # the default corpus; a larger one adds extension blocks after its rows, which stay as they are
EXTENSION_BLOCK = 100  # tools per extension block (ranks 401-500, 501-600, ...)
EXTENSION_ROWS_PER_TOOL = MIN_SINGLE_TOOL_ROWS  # single-tool rows of an extension tool, below rank 400's 65

ANSWER_ENCODER = json.JSONEncoder(ensure_ascii=False)

Sampler = Callable[[random.Random], Any]

# ---------------------------------------------------------------------------------------------------------------
# Random draws and parameter values
# ---------------------------------------------------------------------------------------------------------------


def _choice(rng: random.Random, values: Sequence[Any]) -> Any:
    """Uniform pick (faster than `Random.choice`, which matters over a hundred thousand rows)."""
    return values[int(rng.random() * len(values))]


def _below(rng: random.Random, high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(rng.random() * high)


def _between(rng: random.Random, low: int, high: int) -> int:
    """Uniform integer in [low, high)."""
    return low + int(rng.random() * (high - low))


def _shuffle(rng: random.Random, items: list) -> None:
    """In-place Fisher-Yates shuffle driven by `rng.random()`."""
    for i in range(len(items) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        items[i], items[j] = items[j], items[i]


def _domain(rng: random.Random) -> str:
    return f"{_choice(rng, DOMAIN_WORDS)}{_choice(rng, DOMAIN_WORDS)}.{_choice(rng, TLDS)}"


def _person(rng: random.Random) -> str:
    return f"{_choice(rng, FIRST_NAMES)} {_choice(rng, LAST_NAMES)}"


def _text(rng: random.Random) -> str:
    first, second = rng.sample(TEXTS, 2)
    return f"{first} {second}"


def _expression(rng: random.Random) -> str:
    a, b, c = _between(rng, 2, 100), _between(rng, 2, 100), _between(rng, 2, 20)
    return _choice(rng, EXPRESSION_FORMS).format(a=a, b=b, c=c)


def _season(rng: random.Random) -> str:
    year = _between(rng, 2000, 2025)
    return f"{year}-{year + 1}"


# The value makers that `ParamSpec.maker` names ("code" is built per parameter from its prefix and range).
MAKERS: dict[str, Sampler] = {
    "date": lambda rng: dt.date.fromordinal(FIRST_DAY + _below(rng, NUM_DAYS)).isoformat(),
    "time": lambda rng: f"{_between(rng, 6, 23):02d}:{_choice(rng, QUARTER_HOURS):02d}",
    "person": _person,
    "title": lambda rng: f"The {_choice(rng, TITLE_ADJECTIVES)} {_choice(rng, TITLE_NOUNS)}",
    "username": lambda rng: f"{_choice(rng, FIRST_NAMES).lower()}_{_choice(rng, TITLE_NOUNS).lower()}"
                            f"{_between(rng, 10, 1000)}",
    "email": lambda rng: f"{_choice(rng, FIRST_NAMES).lower()}.{_choice(rng, LAST_NAMES).lower()}"
                         f"@{_choice(rng, EMAIL_DOMAINS)}",
    "domain": _domain,
    "url": lambda rng: f"https://{_domain(rng)}/{_choice(rng, TITLE_NOUNS).lower()}-{_between(rng, 1, 1000)}",
    "ip": lambda rng: ".".join(str(_between(rng, 1, 255)) for _ in range(4)),
    "phone": lambda rng: f"+1-{_between(rng, 200, 1000)}-{_between(rng, 200, 1000)}-{_below(rng, 10000):04d}",
    "address": lambda rng: f"{_between(rng, 1, 10000)} {_choice(rng, STREETS)} {_choice(rng, STREET_SUFFIXES)}",
    "company": lambda rng: f"{_choice(rng, COMPANY_PREFIXES)} {_choice(rng, COMPANY_SUFFIXES)}",
    "team": lambda rng: f"{_choice(rng, CITIES)} {_choice(rng, TEAM_MASCOTS)}",
    "text": _text,
    "expression": _expression,
    "season": _season,
    "flight_number": lambda rng: f"{_choice(rng, AIRLINE_CODES)}{_between(rng, 10, 10000)}",
    "zip_code": lambda rng: f"{_between(rng, 10000, 100000)}",
    "playlist": lambda rng: f"{_choice(rng, PLAYLIST_MOODS)} {_choice(rng, TITLE_NOUNS)} Mix",
    "restaurant": lambda rng: f"{_choice(rng, FIRST_NAMES)}'s {_choice(rng, PLACE_WORDS)}",
    "instance_id": lambda rng: f"i-{rng.getrandbits(32):08x}",
    "server_id": lambda rng: f"srv-{_between(rng, 1, 1000):03d}",
    "vin": lambda rng: "".join(_choice(rng, VIN_CHARS) for _ in range(17)),
    "api_key": lambda rng: f"key_{rng.getrandbits(48):012x}",
    "coupon": lambda rng: f"SAVE{_between(rng, 5, 60)}-{''.join(_choice(rng, UPPER) for _ in range(4))}",
    "hashtag": lambda rng: _choice(rng, KEYWORDS).title().replace(" ", ""),
}


def _sampler(spec: ParamSpec) -> Sampler:
    """The value sampler of one parameter: its maker, its number range or its pool, as its table entry says."""
    if spec.maker == "code":
        prefix, first, end = spec.prefix, int(spec.low), int(spec.high)
        return lambda rng: f"{prefix}{_between(rng, first, end)}"
    if spec.maker:
        return MAKERS[spec.maker]
    if spec.kind == "bool":
        return lambda rng: rng.random() < 0.5
    if spec.kind == "int":
        first, step = int(spec.low), spec.step
        size = (int(spec.high) - first) // step + 1
        return lambda rng: first + step * _below(rng, size)
    if spec.kind == "float":
        low, high, decimals = spec.low, spec.high, spec.decimals
        return lambda rng: round(low + (high - low) * rng.random(), decimals)
    values = spec.values
    return lambda rng: _choice(rng, values)


SAMPLERS: dict[str, Sampler] = {name: _sampler(spec) for name, spec in PARAMS.items()}


# ---------------------------------------------------------------------------------------------------------------
# Tool catalog
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryTemplate:
    """One way to ask for a tool: an opener, an action phrase, the order of the clauses and each one's phrasing."""

    opener: tuple[str, str]
    action: str
    order: tuple[str, ...]
    phrasing: dict[str, int]


@dataclass(frozen=True)
class ToolSpec:
    """A tool of the catalog with what the generator needs beyond its xLAM definition."""

    name: str
    description: str
    required: tuple[str, ...]
    optional: tuple[tuple[str, Any], ...]
    actions: tuple[str, ...]
    templates: tuple[QueryTemplate, ...] = field(default=(), compare=False)
    domain_object: str = field(default="", compare=False)

    def to_xlam(self) -> dict:
        """The tool as xLAM spells it: name, description and typed parameters (optional ones with a default)."""
        parameters: dict[str, dict] = {}
        for name in self.required:
            spec = PARAMS[name]
            parameters[name] = {"description": spec.description, "type": spec.kind}
        for name, default in self.optional:
            spec = PARAMS[name]
            parameters[name] = {"description": spec.description, "type": f"{spec.kind}, optional", "default": default}
        return {"name": self.name, "description": self.description, "parameters": parameters}

    @property
    def key_param(self) -> str:
        """The parameter that varies between the calls of a same-tool multi-call row."""
        for name in self.required:
            if PARAMS[name].kind != "bool" and PARAMS[name].space >= 5:
                return name
        raise AssertionError(f"tool {self.name} has no parameter that can vary between calls")


def _merge_params(
    required_lists: Sequence[Sequence[str]], optional_lists: Sequence[Sequence[tuple[str, Any]]], drops: Sequence[str]
) -> tuple[tuple[str, ...], tuple[tuple[str, Any], ...]]:
    """Concatenate parameter lists in order, without duplicates; a name required anywhere is never optional."""
    required: list[str] = []
    for names in required_lists:
        required.extend(name for name in names if name not in required and name not in drops)
    optional: list[tuple[str, Any]] = []
    for pairs in optional_lists:
        for name, default in pairs:
            if name not in required and name not in drops and all(name != seen for seen, _ in optional):
                optional.append((name, default))
    return tuple(required), tuple(optional)


def _compose(obj: DomainObject, verb_name: str, qualifier_name: str | None, scope_name: str | None = None) -> ToolSpec:
    """Compose verb x object x qualifier (x scope, for the extension) into one tool (name, description, parameters,
    action phrases)."""
    verb = VERBS[verb_name]
    qualifier = QUALIFIERS[qualifier_name] if qualifier_name else Qualifier("", "", frozenset())
    required, optional = _merge_params(
        (obj.required, verb.required, qualifier.required),
        (obj.optional, verb.optional, qualifier.optional),
        qualifier.drops,
    )
    name = f"{verb_name}_{obj.key}" + (f"_{qualifier_name}" if qualifier_name else "")
    phrase = obj.phrase + qualifier.phrase
    description = f"{verb.describe} {obj.describe}{qualifier.describe}."
    if scope_name:
        scope = SCOPES[scope_name]
        name, phrase = f"{name}_{scope_name}", phrase + scope.phrase
        description = f"{description[:-1]}{scope.describe}."
    return ToolSpec(name, description, required, optional, tuple(a.format(o=phrase) for a in verb.actions),
                    domain_object=obj.key)


def _all_candidates() -> list[ToolSpec]:
    """Every tool the verb x object x qualifier grammar allows, sorted by name."""
    tools = []
    for obj in DOMAIN_OBJECTS:
        for verb_name in obj.verbs:
            tools.append(_compose(obj, verb_name, None))
            tools.extend(
                _compose(obj, verb_name, q) for q in obj.qualifiers if verb_name in QUALIFIERS[q].verbs
            )
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise AssertionError("the tool grammar produced a duplicate name")
    return sorted(tools, key=lambda tool: tool.name)


CANDIDATES: tuple[ToolSpec, ...] = tuple(_all_candidates())


def _extension_catalog(seed: int) -> list[ToolSpec]:
    """The tools ranked after the first BASE_NUM_TOOLS, in rank order: one per domain object and scope (SCOPES), its
    verb and qualifier drawn from those the object takes; pairs in a shuffled order, whole blocks only. No name is a
    base candidate's (the scope is a suffix), so no extension tool is one the embedded backbone was pretrained on."""
    rng = random.Random(f"catalog-extension:{seed}")
    pairs = [(obj, scope) for obj in DOMAIN_OBJECTS for scope in SCOPES]
    rng.shuffle(pairs)
    tools = []
    for obj, scope in pairs:
        forms = [(verb, None) for verb in obj.verbs]
        forms += [(verb, q) for verb in obj.verbs for q in obj.qualifiers if verb in QUALIFIERS[q].verbs]
        verb, qualifier = forms[rng.randrange(len(forms))]
        tools.append(_compose(obj, verb, qualifier, scope))
    names = {tool.name for tool in tools} | {tool.name for tool in CANDIDATES}
    if len(names) != len(tools) + len(CANDIDATES):
        raise AssertionError("the extension grammar produced a duplicate name")
    return tools[: len(tools) // EXTENSION_BLOCK * EXTENSION_BLOCK]


MAX_NUM_TOOLS = BASE_NUM_TOOLS + len(_extension_catalog(CATALOG_SEED))


def _clause_order(params: Sequence[str], rng: random.Random) -> tuple[str, ...]:
    """A random order of the clauses that keeps each ordered pair (start/end, from/to, ...) adjacent and in order."""
    seconds = {ORDERED_PAIRS[name] for name in params if name in ORDERED_PAIRS and ORDERED_PAIRS[name] in params}
    units = []
    for name in params:
        if name in seconds:
            continue
        partner = ORDERED_PAIRS.get(name)
        units.append((name, partner) if partner in seconds else (name,))
    rng.shuffle(units)
    return tuple(name for unit in units for name in unit)


def _make_templates(tool: ToolSpec, seed: int) -> tuple[QueryTemplate, ...]:
    """TEMPLATES_PER_TOOL distinct (opener, action) pairs, each with its own clause order and phrasings."""
    rng = random.Random(f"templates:{seed}:{tool.name}")
    pairs = [(opener, action) for opener in OPENERS for action in tool.actions
             if not (opener[0].startswith(FIRST_PERSON_OPENERS) and " me " in f" {action} ")]
    chosen = rng.sample(pairs, min(TEMPLATES_PER_TOOL, len(pairs)))
    params = list(tool.required) + [name for name, _ in tool.optional]
    templates = []
    for opener, action in chosen:
        phrasing: dict[str, int] = {}
        for name in params:
            first = next((a for a, b in ORDERED_PAIRS.items() if b == name), None)
            if first in phrasing:
                phrasing[name] = phrasing[first]
            else:
                phrasing[name] = rng.randrange(max(len(PARAMS[name].clauses), len(PARAMS[name].false_clauses)))
        templates.append(QueryTemplate(opener, action, _clause_order(params, rng), phrasing))
    return tuple(templates)


def _with_templates(tool: ToolSpec, seed: int) -> ToolSpec:
    return replace(tool, templates=_make_templates(tool, seed))


def _search_tool() -> ToolSpec:
    tool = _compose(SEARCH_OBJECT, "search", None)
    return ToolSpec(SEARCH_TOOL, SEARCH_DESCRIPTION, tool.required, tool.optional, SEARCH_ACTIONS)


def check_num_tools(num_tools: int) -> None:
    """A corpus holds 1..BASE_NUM_TOOLS tools, or BASE_NUM_TOOLS plus whole extension blocks up to MAX_NUM_TOOLS."""
    if not 1 <= num_tools <= MAX_NUM_TOOLS:
        raise ValueError(f"num_tools must be between 1 and {MAX_NUM_TOOLS}, got {num_tools}")
    if num_tools > BASE_NUM_TOOLS and (num_tools - BASE_NUM_TOOLS) % EXTENSION_BLOCK:
        raise ValueError(f"num_tools above {BASE_NUM_TOOLS} grows in blocks of {EXTENSION_BLOCK}, got {num_tools}")


def corpus_size_for(last_rank: int) -> int:
    """The smallest valid corpus size that ranks `last_rank` tools: the default, or whole extension blocks past it."""
    blocks = -(-(last_rank - BASE_NUM_TOOLS) // EXTENSION_BLOCK)
    return BASE_NUM_TOOLS + EXTENSION_BLOCK * max(0, blocks)


def _select_tools(seed: int, num_tools: int) -> list[ToolSpec]:
    """`search` first, then `num_tools` catalog tools in the order of intended use (most used first)."""
    check_num_tools(num_tools)
    if num_tools > BASE_NUM_TOOLS:
        extension = [_with_templates(tool, seed) for tool in _extension_catalog(seed)[: num_tools - BASE_NUM_TOOLS]]
        return _select_tools(seed, BASE_NUM_TOOLS) + extension
    rng = random.Random(f"catalog:{seed}")
    chosen = rng.sample(CANDIDATES, num_tools)
    # One tool per domain object comes before any second tool of an object, so the most used tools (the default
    # rounds) never hold two variants of one object: verbs share phrasings ("get" and "fetch" both say "fetch the
    # address coordinates"), and the gold tool of such a query would be a coin toss between rounds.
    seen: set[str] = set()
    first_of_object, variants = [], []
    for tool in chosen:
        (variants if tool.domain_object in seen else first_of_object).append(tool)
        seen.add(tool.domain_object)
    return [_with_templates(tool, seed) for tool in [_search_tool(), *first_of_object, *variants]]


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


def single_tool_counts(num_tools: int) -> list[int]:
    """Single-tool rows per rank (1-based rank r at index r-1): Zipf-like head, distinct counts, >= 60 at the tail."""
    return [num_tools + MIN_SINGLE_TOOL_ROWS - rank + ZIPF_MASS // rank for rank in range(1, num_tools + 1)]


@dataclass(frozen=True)
class PlannedRow:
    """What a row will call: `tools` (indices into the selected tools) and how many calls of the first one."""

    tools: tuple[int, ...]
    calls: int = 1


def _row_plan(num_tools: int, rng: random.Random) -> list[PlannedRow]:
    """Single-call, same-tool multi-call and multi-tool rows, in a shuffled order. Index 0 is `search`."""
    counts = single_tool_counts(num_tools)
    return _plan_counts([round(SEARCH_SHARE_OF_TOP * counts[0]), *counts], rng)


def _block_plan(size: int, rng: random.Random) -> list[PlannedRow]:
    """The shuffled rows of an extension block of `size` tools, EXTENSION_ROWS_PER_TOOL single-tool rows each, with
    indices renumbered in the order of each tool's first single-tool row: the tools tie on use, and xlam_datasets
    breaks ties by that order, so index i is the block's i-th rank whatever the row seed."""
    plan = _plan_counts([EXTENSION_ROWS_PER_TOOL] * size, rng)
    order: dict[int, int] = {}
    for planned in plan:
        if len(planned.tools) == 1 and planned.tools[0] not in order:
            order[planned.tools[0]] = len(order)
    return [replace(planned, tools=tuple(order[index] for index in planned.tools)) for planned in plan]


def _plan_counts(counts: Sequence[int], rng: random.Random) -> list[PlannedRow]:
    """`counts[i]` single-tool rows of tool i (some with several calls) and multi-tool rows, shuffled."""
    plan: list[PlannedRow] = []
    for index, count in enumerate(counts):
        multi_call = round(MULTI_CALL_SHARE * count)
        plan.extend(PlannedRow((index,)) for _ in range(count - multi_call))
        plan.extend(PlannedRow((index,), calls=rng.choice(MULTI_SIZES)) for _ in range(multi_call))
    population = list(range(len(counts)))
    for _ in range(round(MULTI_TOOL_SHARE * sum(counts))):
        size = rng.choice(MULTI_SIZES)
        chosen: list[int] = []
        while len(chosen) < size:
            (pick,) = rng.choices(population, weights=counts)
            if pick not in chosen:
                chosen.append(pick)
        plan.append(PlannedRow(tuple(chosen)))
    rng.shuffle(plan)
    return plan


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lowercase_start(query: str) -> str:
    """Lower-case the first letter of a generated query so it can follow a connector (the pronoun I stays)."""
    if query.startswith(("I ", "I'")):
        return query
    return query[:1].lower() + query[1:]


class RowWriter:
    """Renders planned rows into xLAM rows; every query it returns is distinct."""

    def __init__(self, tools: Sequence[ToolSpec], rng: random.Random) -> None:
        self.tools = list(tools)
        self.rng = rng
        self.tool_json = [json.dumps(tool.to_xlam(), ensure_ascii=False) for tool in self.tools]
        self.seen: set[str] = set()

    def _arguments(self, tool: ToolSpec) -> dict[str, Any]:
        """Values for every required parameter and for a random subset of the optional ones, in signature order."""
        rng = self.rng
        arguments = {name: SAMPLERS[name](rng) for name in tool.required}
        for name, _ in tool.optional:
            if rng.random() < 0.4:
                arguments[name] = SAMPLERS[name](rng)
        for first, second, longest in DATE_SPANS:
            if first in arguments and second in arguments:
                start = dt.date.fromisoformat(arguments[first])
                arguments[second] = (start + dt.timedelta(days=1 + _below(rng, longest))).isoformat()
        return arguments

    @staticmethod
    def _clauses(template: QueryTemplate, arguments: dict[str, Any]) -> str:
        phrasing = template.phrasing
        return " ".join([PARAMS[name].clause(arguments[name], phrasing[name]) for name in template.order
                         if name in arguments])

    def _render(self, tool: ToolSpec, calls: int) -> tuple[str, list[dict]]:
        """One query for `calls` calls of `tool`: extra calls change only the tool's key parameter."""
        template = _choice(self.rng, tool.templates)
        arguments = self._arguments(tool)
        start, end = template.opener
        body = start.format(a=template.action, A=_capitalized(template.action),
                            C=self._clauses(template, arguments))
        answers = [{"name": tool.name, "arguments": arguments}]
        if calls > 1:
            key = tool.key_param
            spec = PARAMS[key]
            values = [arguments[key]]
            while len(values) < calls:
                value = SAMPLERS[key](self.rng)
                if value not in values:
                    values.append(value)
            index = template.phrasing[key]
            rest = " and ".join(spec.clause(value, index) for value in values[1:])
            body += _choice(self.rng, MULTI_CALL_LINKS).format(rest=rest)
            answers += [{"name": tool.name, "arguments": {**arguments, key: value}} for value in values[1:]]
        return body + end, answers

    def _compose(self, planned: PlannedRow) -> tuple[str, list[dict]]:
        parts = [self._render(self.tools[index], planned.calls if position == 0 else 1)
                 for position, index in enumerate(planned.tools)]
        query, answers = parts[0]
        for next_query, next_answers in parts[1:]:
            query += _choice(self.rng, ROW_CONNECTORS) + _lowercase_start(next_query)
            answers = answers + next_answers
        return query, answers

    def _offered_tools(self, called: Sequence[int]) -> str:
        """The called tools plus a few distractors, shuffled, as one JSON list (tools are pre-encoded)."""
        offered = list(dict.fromkeys(called))
        wanted = min(len(offered) + _choice(self.rng, DISTRACTOR_CHOICES), len(self.tools))
        while len(offered) < wanted:
            pick = _below(self.rng, len(self.tools))
            if pick not in offered:
                offered.append(pick)
        _shuffle(self.rng, offered)
        return "[" + ", ".join(self.tool_json[index] for index in offered) + "]"

    def row(self, row_id: int, planned: PlannedRow) -> dict:
        """The xLAM row for a planned row; resamples values until its query is new."""
        for _ in range(MAX_RESAMPLES):
            query, answers = self._compose(planned)
            if query not in self.seen:
                self.seen.add(query)
                break
        else:
            raise RuntimeError(f"could not find a new query for tools {planned.tools}; widen their value spaces")
        return {
            "id": row_id,
            "query": query,
            "tools": self._offered_tools(planned.tools),
            "answers": ANSWER_ENCODER.encode(answers),
        }


def generate_rows(
    seed: int = 0, num_tools: int = 400, num_rows: int | None = None, catalog_seed: int = CATALOG_SEED
) -> list[dict]:
    """xLAM rows for `search` plus `num_tools` tools; `num_rows` keeps that many of them (a deterministic subset).

    Past BASE_NUM_TOOLS, each extension block of EXTENSION_BLOCK tools adds its own rows after the default corpus's,
    from its own generator (`rows-extension:{seed}:{first rank - 1}`), offering distractors from its own tools: the
    default corpus's rows stay byte for byte what a 400-tool corpus has, and a block's rows do not depend on later
    blocks.

    `seed` drives the values, the row mix and the order; the catalog (names, ranks, query templates) comes from
    `catalog_seed`, so rank r names the same tool whatever `seed` is and disjoint rank ranges stay disjoint
    between corpora generated with different seeds.
    """
    tools = _select_tools(catalog_seed, num_tools)
    base = min(num_tools, BASE_NUM_TOOLS)
    rng = random.Random(f"rows:{seed}")
    parts = [(RowWriter(tools[: base + 1], rng), _row_plan(base, rng))]
    for first in range(base + 1, len(tools), EXTENSION_BLOCK):
        block_rng = random.Random(f"rows-extension:{seed}:{first - 1}")
        parts.append((RowWriter(tools[first:first + EXTENSION_BLOCK], block_rng),
                      _block_plan(EXTENSION_BLOCK, block_rng)))
    planned_rows = [(writer, planned) for writer, plan in parts for planned in plan]
    if num_rows is not None:
        planned_rows = planned_rows[:num_rows]
    progress = tqdm(planned_rows, desc="generating rows", unit="row", disable=None, leave=False)
    return [writer.row(row_id, planned) for row_id, (writer, planned) in enumerate(progress)]


def spare_tools(num_tools: int = 400, catalog_seed: int = CATALOG_SEED) -> list[ToolSpec]:
    """The grammar's tools that a corpus of `num_tools` tools never calls, sorted by name, with their query templates."""
    chosen = {tool.name for tool in _select_tools(catalog_seed, num_tools)}
    return [_with_templates(tool, catalog_seed) for tool in CANDIDATES if tool.name not in chosen]


def generate_tool_rows(tools: Sequence[ToolSpec], rows_per_tool: int, seed: int = 0) -> list[dict]:
    """`rows_per_tool` single-tool rows for each of `tools` (MULTI_CALL_SHARE of them with several calls), shuffled:
    rows for tools outside a corpus, written by the corpus's own grammar."""
    rng = random.Random(f"tool-rows:{seed}")
    multi_call = round(MULTI_CALL_SHARE * rows_per_tool)
    plan = [PlannedRow((index,), calls=rng.choice(MULTI_SIZES) if k < multi_call else 1)
            for index in range(len(tools)) for k in range(rows_per_tool)]
    rng.shuffle(plan)
    writer = RowWriter(tools, rng)
    return [writer.row(row_id, planned) for row_id, planned in enumerate(plan)]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the synthetic rows as one JSON list."""
    parser = CliParser(description="Write synthetic function-calling rows in the xLAM format.")
    parser.add_argument("--output", required=True, help="JSON file to write (one list of rows)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the rows; the tool catalog is the same for every seed (default 0)")
    parser.add_argument("--num_tools", type=positive_int, default=400,
                        help=f"tools besides `search` (at most {MAX_NUM_TOOLS}, above 400 in blocks of "
                             f"{EXTENSION_BLOCK}; default 400)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.num_tools > MAX_NUM_TOOLS:
        raise UserError(f"--num_tools: at most {MAX_NUM_TOOLS} tools can be composed, got {args.num_tools}")
    if args.num_tools > BASE_NUM_TOOLS and (args.num_tools - BASE_NUM_TOOLS) % EXTENSION_BLOCK:
        raise UserError(f"--num_tools: above {BASE_NUM_TOOLS} the corpus grows in blocks of {EXTENSION_BLOCK} tools, "
                        f"got {args.num_tools}")
    rows = generate_rows(seed=args.seed, num_tools=args.num_tools)
    atomic_write_json(args.output, rows, indent=None)
    logger.info("wrote %d rows for %d tools to %s", len(rows), args.num_tools + 1, args.output)
    print(f"{len(rows)} rows, {args.num_tools} tools plus '{SEARCH_TOOL}': {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
