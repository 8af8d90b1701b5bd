"""Natural prompt wordings: a development set of requests that never name their tag.

Users do not write "I want Comedy"; they write "something to make me laugh" or "nothing with cartoons".
The prompt bank (:mod:`dpr.data.prompts`) renders templates around the tag's name, and so do its held-out
wordings. A wordings file describes each tag through its meaning, content or use instead::

    {"description": "...",                       # optional
     "positive": {"Comedy": ["something to make me laugh", ...], ...},
     "negative": {"Animation": ["nothing with cartoons", ...], ...}}

Files live in ``configs/wordings/<dataset>.json`` (``ml-1m.json``; a folder dataset: its folder's name).
They are an **evaluation** set: nothing in :mod:`dpr.train` reads them, and the evaluation protocol
(:func:`dpr.eval.protocol.evaluate` with ``wordings=``) embeds them apart from the training prompt table.

:func:`load_wordings` / :meth:`NaturalWordings.from_dict` refuse, naming the tag and the wording:
unknown tag names, lists that are empty or not lists of strings, duplicate wordings, and any wording that
names its own tag (:func:`names_tag`). Tags without wordings are allowed (see
:meth:`NaturalWordings.coverage`); evaluation skips, and counts, the cases whose tag has none.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from dpr.errors import DataError

from dpr.data.prompts import NEGATIVE, POSITIVE, _polarity  # one polarity vocabulary for templates and wordings

POLARITIES = (POSITIVE, NEGATIVE)
WORDINGS_DIR = Path("configs") / "wordings"

# ---- names_tag --------------------------------------------------------------------------------------

# words of a tag name that carry no meaning of their own ("Other Office Equipment")
STOPWORDS = frozenset({"and", "the", "for", "with", "other", "from", "not", "non", "all", "any", "misc"})
# irregular forms, mapped to one form on both sides
_IRREGULAR = {"children": "child", "women": "woman", "men": "man", "written": "write", "wrote": "write",
              "indices": "index", "mice": "mouse", "bound": "bind"}
# derived forms the suffix rules cannot reach, per content word of a tag (phrases as space-joined words)
ALIASES = {
    "comedy": ("comic", "comics", "comical", "comically", "romcom", "romcoms", "rom com", "rom coms"),
    "romance": ("romantic", "romantically", "romcom", "romcoms", "rom com", "rom coms"),
    "sci": ("science", "sciences", "scifi", "science fiction", "sf"),
    "war": ("warfare", "wartime", "warzone", "warzones", "warlord", "warlords", "warship", "warships"),
    "ink": ("inkjet", "inkjets"),
    "documentary": ("doc", "docs", "docu", "docuseries", "docos", "doco"),
    "fax": ("telefax",),
}
# a word's ending after the stem it shares with a tag word: inflections ...
_INFLECT = frozenset({"", "s", "es", "ies", "y", "e", "ed", "ied", "ing", "ings", "er", "ers", "or", "ors"})
# ... and derivations (a derived form matches when the other side's ending is an inflection)
_DERIVE = frozenset({
    "al", "als", "ally", "ic", "ics", "ical", "ically", "ian", "ians", "ion", "ions", "ation", "ations",
    "ment", "ments", "ement", "ements", "ary", "aries", "ous", "ious", "ity", "ist", "ists", "ism", "ish",
    "ive", "ives", "ize", "ized", "izes", "izing", "ify", "ified", "ifying", "ific", "ible", "able", "ern",
    "erns", "hood", "ly", "ness", "tic", "tical", "inal", "inals", "ory", "ories", "age", "ages", "ery",
})
_ENDINGS = _INFLECT | _DERIVE
_BRITISH = (("isations", "izations"), ("isation", "ization"), ("ising", "izing"), ("ised", "ized"),
            ("ises", "izes"), ("isers", "izers"), ("iser", "izer"), ("ise", "ize"))


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z]+", text.lower()) if w]


def _norm(word: str) -> str:
    word = _IRREGULAR.get(word, word)
    for gb, us in _BRITISH:
        if word.endswith(gb) and len(word) - len(gb) >= 4:
            return word[:-len(gb)] + us
    return word


def tag_words(tag: str) -> list[str]:
    """The content words of a tag name: split on non-letters, lowercase, length >= 3, no stopwords
    ("Children's" -> ["child"] (normalised), "Sci-Fi" -> ["sci"], "Tape, Adhesives & Fasteners" ->
    ["tape", "adhesives", "fasteners"])."""
    out: list[str] = []
    for w in _words(tag):
        if len(w) >= 3 and w not in STOPWORDS:
            w = _norm(w)
            if w not in out:
                out.append(w)
    return out


def _ending_ok(rest: str, prev: str, allowed) -> bool:
    """``rest`` is an allowed ending, or a doubled consonant (``prev``) then one ("planning", "warring")."""
    if rest in allowed:
        return True
    return len(rest) >= 2 and rest[0] == prev and rest[0] not in "aeiou" and rest[1:] in allowed \
        and rest[1] in "aeiouy"


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def _same_word(w: str, t: str) -> bool:
    """Whether the wording's word ``w`` is a form of the tag word ``t`` (both normalised)."""
    if w == t:
        return True
    cp = 0
    while cp < min(len(w), len(t)) and w[cp] == t[cp]:
        cp += 1
    # a shared stem with endings on both sides: at least one an inflection, the other any known ending;
    # a stem of 3 letters only with inflections on both sides ("file" / "filing", "war" / "warring")
    for k in range(cp, 2, -1):
        rw, rt, prev = w[k:], t[k:], w[k - 1]
        infl_w, infl_t = _ending_ok(rw, prev, _INFLECT), _ending_ok(rt, prev, _INFLECT)
        if k >= 4:
            if (infl_w and _ending_ok(rt, prev, _ENDINGS)) or (infl_t and _ending_ok(rw, prev, _ENDINGS)):
                return True
        elif infl_w and infl_t:
            return True
    # compounds: the tag word inside the wording's word ("armchair", "paperwork", "newspaper") ...
    ts = _singular(t)
    if len(ts) >= 4 and len(w) > len(ts) and (w.startswith(ts) or w.endswith(ts)):
        return True
    # ... or the wording's word as a part of a compound tag word ("phone" in "telephones",
    # "record" in "recordkeeping", "space" in "workspace")
    ws = _singular(w)
    for part in {w, ws}:
        if len(part) >= 5 and part != t and (t.startswith(part) or t.endswith(part) or ts.endswith(part)):
            return True
    return False


def names_tag(wording: str, tag: str) -> bool:
    """Whether ``wording`` names ``tag``: one of its words is a content word of the tag's name (length >= 3
    after splitting on non-letters, case-insensitive) or a simple form of one (plural, possessive, verb
    and agent forms, common derivations: "comedies", "comedian", "animated", "horrifying", "west" for
    "Western", "child" for "Children's", "armchair" for "Chairs & Sofas", "phone" for "Telephones"), or a
    listed alias ("science fiction" for "Sci-Fi", "comic" for "Comedy", "inkjet" for "... Ink ...")."""
    words = [_norm(w) for w in _words(wording)]
    joined = " " + " ".join(words) + " "
    for t in tag_words(tag):
        for alias in ALIASES.get(t, ()):
            if f" {alias} " in joined:
                return True
        if any(_same_word(w, t) for w in words):
            return True
    return False


# ---- the wordings set -------------------------------------------------------------------------------

def _key(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class NaturalWordings:
    """Validated natural wordings per polarity and tag (tag order as in the file)."""

    positive: Mapping[str, tuple[str, ...]]
    negative: Mapping[str, tuple[str, ...]]
    source: str = ""
    description: str = ""
    fingerprint: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.fingerprint:
            blob = json.dumps({POSITIVE: {t: list(v) for t, v in self.positive.items()},
                               NEGATIVE: {t: list(v) for t, v in self.negative.items()}}, sort_keys=True)
            object.__setattr__(self, "fingerprint", hashlib.sha1(blob.encode()).hexdigest()[:16])

    # -- PromptBank-style lookup
    def wordings(self, polarity, tag: str) -> list[str]:
        """The natural wordings of ``tag`` for ``polarity`` ("positive"/"negative"/1/2); [] when none."""
        return list(self._by(polarity).get(tag, ()))

    def sample(self, polarity, tag: str, rng) -> str:
        ws = self._by(polarity).get(tag, ())
        if not ws:
            raise KeyError(f"no {_polarity(polarity)} wordings for tag {tag!r}")
        return ws[int(rng.integers(len(ws)))]

    def tags(self, polarity) -> list[str]:
        return list(self._by(polarity))

    def texts(self) -> list[str]:
        """Every wording once (both polarities), in file order."""
        out: dict[str, None] = {}
        for pol in POLARITIES:
            for ws in self._by(pol).values():
                for w in ws:
                    out.setdefault(w)
        return list(out)

    def __len__(self) -> int:
        return sum(len(ws) for pol in POLARITIES for ws in self._by(pol).values())

    def coverage(self, tag_names: Iterable[str]) -> dict:
        """Per polarity: how many of ``tag_names`` have wordings, and which have none."""
        names = list(tag_names)
        out = {}
        for pol in POLARITIES:
            have = self._by(pol)
            missing = [t for t in names if not have.get(t)]
            out[pol] = {"tags": len(names) - len(missing), "of": len(names), "missing": missing,
                        "wordings": sum(len(have.get(t, ())) for t in names)}
        return out

    def _by(self, polarity) -> Mapping[str, tuple[str, ...]]:
        return self.positive if _polarity(polarity) == POSITIVE else self.negative

    # -- construction
    @classmethod
    def from_dict(cls, data, tag_names: Iterable[str] | None = None, source: str = "",
                  min_per_tag: int = 1) -> "NaturalWordings":
        """Validate ``data`` (the file's JSON) against ``tag_names`` (skipped when None); raises
        :class:`~dpr.errors.DataError` naming the tag and wording at fault."""
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise DataError(f"{where}a wordings file must be a JSON object with 'positive' and 'negative'")
        unknown_keys = set(data) - {POSITIVE, NEGATIVE, "description"}
        if unknown_keys:
            raise DataError(f"{where}unknown keys {sorted(unknown_keys)}; expected 'positive', 'negative' "
                            "(and an optional 'description')")
        names = None if tag_names is None else list(tag_names)
        seen: dict[str, tuple[str, str]] = {}
        parsed: dict[str, dict[str, tuple[str, ...]]] = {}
        for pol in POLARITIES:
            if pol not in data:
                raise DataError(f"{where}missing the {pol!r} section (an object: tag name -> list of wordings)")
            section = data[pol]
            if not isinstance(section, dict):
                raise DataError(f"{where}{pol!r} must be an object: tag name -> list of wordings")
            parsed[pol] = {}
            for tag, ws in section.items():
                if names is not None and tag not in names:
                    close = difflib.get_close_matches(tag, names, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else f"; known tags: {', '.join(names)}"
                    raise DataError(f"{where}{pol} wordings for unknown tag {tag!r}{hint}")
                if not isinstance(ws, list) or not ws:
                    raise DataError(f"{where}{pol} wordings of tag {tag!r} must be a non-empty list of strings")
                if len(ws) < min_per_tag:
                    raise DataError(f"{where}tag {tag!r} has {len(ws)} {pol} wordings; at least {min_per_tag} "
                                    "are required")
                clean = []
                for w in ws:
                    if not isinstance(w, str) or not w.strip():
                        raise DataError(f"{where}{pol} wordings of tag {tag!r}: {w!r} is not a non-empty string")
                    w = " ".join(w.split())
                    k = _key(w)
                    if k in seen:
                        p0, t0 = seen[k]
                        raise DataError(f"{where}duplicate wording {w!r}: {pol} for tag {tag!r}, already "
                                        f"{p0} for tag {t0!r}")
                    seen[k] = (pol, tag)
                    if names_tag(w, tag):
                        raise DataError(f"{where}{pol} wording {w!r} names its tag {tag!r} (words of the tag "
                                        f"name: {', '.join(tag_words(tag))}); describe the tag without naming it")
                    clean.append(w)
                parsed[pol][tag] = tuple(clean)
        desc = data.get("description", "")
        if not isinstance(desc, str):
            raise DataError(f"{where}'description' must be a string")
        return cls(parsed[POSITIVE], parsed[NEGATIVE], source=source, description=desc)

    def to_dict(self) -> dict:
        out: dict = {"description": self.description} if self.description else {}
        out.update({POSITIVE: {t: list(v) for t, v in self.positive.items()},
                    NEGATIVE: {t: list(v) for t, v in self.negative.items()}})
        return out


def load_wordings(path: str | os.PathLike, tag_names: Iterable[str] | None = None,
                  min_per_tag: int = 1) -> NaturalWordings:
    """Read and validate a wordings file (see the module docstring); ``tag_names``: the catalogue's
    (``catalogue.tag_names``), or None to skip the tag-name check."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: wordings file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: not valid JSON ({exc})") from exc
    return NaturalWordings.from_dict(data, tag_names, source=str(p), min_per_tag=min_per_tag)


# ---- where the files are ----------------------------------------------------------------------------

def wordings_name(dataset: str, data_dir: str | os.PathLike | None = None) -> str | None:
    """The wordings file's stem for a dataset argument (as ``dpr-eval --dataset`` takes it): "ml-1m" for
    ml-1m, a folder's name for a folder dataset, None for synthetic."""
    from dpr.data import ML1M_NAMES

    s = str(dataset).strip()
    if not s or s.lower() == "synthetic":
        return None
    if s.lower() in ML1M_NAMES:
        return "ml-1m"
    path = Path(s).expanduser()
    if data_dir is not None and not path.is_absolute():
        path = Path(data_dir) / path
    try:
        name = path.resolve().name
    except OSError:
        name = path.name
    return name or None


def wordings_dirs() -> list[Path]:
    """Where ``<name>.json`` is looked for: ``$DPR_WORDINGS_DIR``, ``configs/wordings`` under the current
    directory, and under the repository root (when dpr runs from a checkout; an installed package has none)."""
    out = []
    env = os.environ.get("DPR_WORDINGS_DIR")
    if env:
        out.append(Path(env))
    out.append(Path.cwd() / WORDINGS_DIR)
    out.append(Path(__file__).resolve().parents[2] / WORDINGS_DIR)
    seen, uniq = set(), []
    for d in out:
        key = str(d.resolve()) if d.exists() else str(d)
        if key not in seen:
            seen.add(key)
            uniq.append(d)
    return uniq


def find_wordings(dataset: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The wordings file for a dataset argument, or None when there is none (synthetic, no such file,
    no ``configs/`` folder)."""
    name = wordings_name(dataset, data_dir)
    if not name:
        return None
    for d in wordings_dirs():
        p = d / f"{name}.json"
        if p.is_file():
            return p
    return None


__all__ = ["NaturalWordings", "load_wordings", "names_tag", "tag_words", "find_wordings", "wordings_name",
           "wordings_dirs", "POSITIVE", "NEGATIVE", "ALIASES", "STOPWORDS"]
