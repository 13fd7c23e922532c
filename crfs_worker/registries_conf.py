"""registries.conf (containers-registries.conf(5)): where an image is really pulled from.

Supported: the v2 format (`[[registry]]` with prefix, location, insecure, blocked,
mirror-by-digest-only and `[[registry.mirror]]` with location, insecure,
pull-from-mirror), the v1 format (`[registries.insecure]`, `[registries.block]`,
`[registries.search]` lists) and drop-in files. Prefix matching is the one of
containers/image: the longest prefix that the reference string equals or continues
with `/`, `:` or `@`; `*.example.com` matches any subdomain.

Which files are read (`RegistriesConf.from_environment`):
- `$CONTAINERS_REGISTRIES_CONF` alone when set (an explicit choice replaces the defaults,
  which also keeps tests independent of the machine's configuration);
- otherwise `~/.config/containers/registries.conf` if it exists, else
  `/etc/containers/registries.conf`, then the drop-ins `*.conf` of
  `/etc/containers/registries.conf.d` and `~/.config/containers/registries.conf.d`,
  each in name order. A drop-in's `[[registry]]` replaces one with the same prefix.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import CrfsError, InvalidReferenceError, RegistryError
from .reference import ImageReference

SYSTEM_CONF = Path("/etc/containers/registries.conf")
SYSTEM_DROPIN_DIR = Path("/etc/containers/registries.conf.d")
PULL_FROM_MIRROR_MODES = ("all", "digest-only", "tag-only")


class RegistriesConfError(CrfsError):
    """A registries.conf file is malformed; the message names the file and the key."""


class BlockedRegistryError(RegistryError):
    """registries.conf blocks the registry an image would come from."""


@dataclass(frozen=True)
class Mirror:
    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"


@dataclass(frozen=True)
class RegistryEntry:
    """One `[[registry]]` table (or a v1 list item turned into one)."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[Mirror, ...] = ()
    origin: str = ""

    def matched_length(self, ref_text: str) -> int:
        """How many characters of `ref_text` this prefix matches; -1 if it does not."""
        if self.prefix.startswith("*."):
            return _match_subdomain_prefix(ref_text, self.prefix[1:])
        if not ref_text.startswith(self.prefix):
            return -1
        if len(ref_text) == len(self.prefix) or ref_text[len(self.prefix)] in "/:@":
            return len(self.prefix)
        return -1


@dataclass(frozen=True)
class PullSource:
    """One place to fetch an image from: a mirror or the primary location."""

    reference: ImageReference
    insecure: bool
    mirror: bool

    def describe(self) -> str:
        return f"{'mirror' if self.mirror else 'registry'} {self.reference.registry}"


@dataclass(frozen=True)
class RegistriesConf:
    """The merged configuration; an empty one means "pull from where the reference says"."""

    registries: tuple[RegistryEntry, ...] = ()
    unqualified_search_registries: tuple[str, ...] = ()
    files: tuple[Path, ...] = field(default=())

    @classmethod
    def parse(cls, text: str, origin: str) -> "RegistriesConf":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RegistriesConfError(f"{origin}: not valid TOML: {exc}") from None
        return _parse_document(document, origin)

    @classmethod
    def load(cls, paths: list[Path]) -> "RegistriesConf":
        """Reads `paths` in order, later files overriding earlier ones; missing files are skipped."""
        merged = cls()
        for path in paths:
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as exc:
                raise RegistriesConfError(f"{path}: cannot read: {exc}") from None
            merged = merged.merged_with(replace(cls.parse(text, str(path)), files=(path,)))
        return merged

    @classmethod
    def from_environment(
        cls, env: Mapping[str, str] | None = None, home: Path | None = None
    ) -> "RegistriesConf":
        return cls.load(default_conf_paths(env, home))

    def merged_with(self, later: "RegistriesConf") -> "RegistriesConf":
        by_prefix = {entry.prefix: entry for entry in self.registries}
        by_prefix.update({entry.prefix: entry for entry in later.registries})
        return RegistriesConf(
            registries=tuple(by_prefix.values()),
            unqualified_search_registries=(
                later.unqualified_search_registries or self.unqualified_search_registries
            ),
            files=self.files + later.files,
        )

    def find(self, ref: ImageReference) -> RegistryEntry | None:
        """The entry with the longest prefix matching `ref`, if any."""
        ref_text = str(ref)
        best: RegistryEntry | None = None
        best_length = -1
        for entry in self.registries:
            length = entry.matched_length(ref_text)
            if length > best_length:
                best, best_length = entry, length
        return best

    def pull_sources(self, ref: ImageReference) -> list[PullSource]:
        """Mirrors that apply to `ref` (in order), then the primary location."""
        entry = self.find(ref)
        if entry is None:
            return [PullSource(ref, insecure=False, mirror=False)]
        _refuse_blocked(entry, ref)
        sources = [
            PullSource(_rewrite(ref, entry, mirror.location), mirror.insecure, mirror=True)
            for mirror in entry.mirrors
            if _mirror_applies(entry, mirror, ref)
        ]
        sources.append(self.push_source(ref))
        return sources

    def push_source(self, ref: ImageReference) -> PullSource:
        """Where pushes go: the primary location only (never a mirror)."""
        entry = self.find(ref)
        if entry is None:
            return PullSource(ref, insecure=False, mirror=False)
        _refuse_blocked(entry, ref)
        return PullSource(_rewrite(ref, entry, entry.location), entry.insecure, mirror=False)


def default_conf_paths(env: Mapping[str, str] | None = None, home: Path | None = None) -> list[Path]:
    env = os.environ if env is None else env
    explicit = env.get("CONTAINERS_REGISTRIES_CONF")
    if explicit:
        return [Path(explicit)]
    home = Path(env.get("HOME", "~")).expanduser() if home is None else home
    user_dir = home / ".config" / "containers"
    main = user_dir / "registries.conf"
    paths = [main if main.exists() else SYSTEM_CONF]
    for dropin_dir in (SYSTEM_DROPIN_DIR, user_dir / "registries.conf.d"):
        if dropin_dir.is_dir():
            paths.extend(sorted(dropin_dir.glob("*.conf")))
    return paths


def _refuse_blocked(entry: RegistryEntry, ref: ImageReference) -> None:
    if entry.blocked:
        raise BlockedRegistryError(
            f"{ref}: registry {entry.prefix!r} is blocked by {entry.origin or 'registries.conf'}"
        )


def _mirror_applies(entry: RegistryEntry, mirror: Mirror, ref: ImageReference) -> bool:
    # A tag can move, so a mirror lagging behind could serve an old image: the
    # configuration decides whether mirrors may answer tag lookups.
    mode = mirror.pull_from_mirror
    if entry.mirror_by_digest_only:
        mode = "digest-only"
    if mode == "digest-only":
        return ref.digest is not None
    if mode == "tag-only":
        return ref.digest is None
    return True


def _rewrite(ref: ImageReference, entry: RegistryEntry, location: str) -> ImageReference:
    if entry.prefix.startswith("*."):
        return ref
    ref_text = str(ref)
    new_text = location + ref_text[len(entry.prefix) :]
    try:
        rewritten = ImageReference.parse(new_text)
    except InvalidReferenceError as exc:
        raise RegistriesConfError(
            f"{entry.origin}: location {location!r} for prefix {entry.prefix!r} turns "
            f"{ref_text!r} into an invalid reference: {exc}"
        ) from None
    return rewritten


def _match_subdomain_prefix(ref_text: str, suffix: str) -> int:
    # "*.example.com" matches "a.example.com/x" but not "example.com/x" or "x/a.example.com".
    index = ref_text.find(suffix)
    if index <= 0 or "/" in ref_text[:index]:
        return -1
    end = index + len(suffix)
    if end == len(ref_text) or ref_text[end] in "/:@":
        return end
    return -1


def _parse_document(document: dict[str, Any], origin: str) -> RegistriesConf:
    v1 = document.get("registries")
    v2 = document.get("registry", [])
    if v1 is not None and not isinstance(v1, dict):
        raise RegistriesConfError(f"{origin}: 'registries' must be a table (v1 format)")
    if v1 and v2:
        raise RegistriesConfError(f"{origin}: mixes the v1 [registries.*] and v2 [[registry]] formats")
    entries = _parse_v1(v1, origin) if v1 else _parse_v2(v2, origin)
    if v1 and "search" in v1:
        search = _string_list(v1["search"], "registries", f"{origin}: [registries.search]")
    else:
        search = _string_list(document, "unqualified-search-registries", origin)
    return RegistriesConf(registries=tuple(entries), unqualified_search_registries=tuple(search))


def _parse_v1(tables: dict[str, Any], origin: str) -> list[RegistryEntry]:
    entries: dict[str, RegistryEntry] = {}
    for kind in ("insecure", "block"):
        table = tables.get(kind, {})
        where = f"{origin}: [registries.{kind}]"
        if not isinstance(table, dict):
            raise RegistriesConfError(f"{where} must be a table")
        for host in _string_list(table, "registries", where):
            entry = entries.get(host, RegistryEntry(prefix=host, location=host, origin=origin))
            if kind == "insecure":
                entry = replace(entry, insecure=True)
            else:
                entry = replace(entry, blocked=True)
            entries[host] = entry
    return list(entries.values())


def _parse_v2(tables: Any, origin: str) -> list[RegistryEntry]:
    if not isinstance(tables, list):
        raise RegistriesConfError(f"{origin}: 'registry' must be an array of tables ([[registry]])")
    entries: list[RegistryEntry] = []
    for number, table in enumerate(tables, 1):
        where = f"{origin}: [[registry]] #{number}"
        if not isinstance(table, dict):
            raise RegistriesConfError(f"{where} must be a table")
        entries.append(_parse_registry_table(table, where, origin))
    prefixes = [entry.prefix for entry in entries]
    duplicates = {p for p in prefixes if prefixes.count(p) > 1}
    if duplicates:
        raise RegistriesConfError(f"{origin}: prefix {sorted(duplicates)[0]!r} appears twice")
    return entries


def _parse_registry_table(table: dict[str, Any], where: str, origin: str) -> RegistryEntry:
    location = _location(table, "location", where, required=False)
    prefix = _string(table, "prefix", where) or location
    if not prefix:
        raise RegistriesConfError(f"{where}: needs a prefix or a location")
    if prefix.startswith("*."):
        if location:
            raise RegistriesConfError(f"{where}: a wildcard prefix {prefix!r} cannot have a location")
        if "/" in prefix:
            raise RegistriesConfError(f"{where}: a wildcard prefix {prefix!r} must be a bare host")
    elif "*" in prefix:
        raise RegistriesConfError(f"{where}: '*' is only allowed as a leading '*.' in {prefix!r}")
    mirrors_table = table.get("mirror", [])
    if not isinstance(mirrors_table, list):
        raise RegistriesConfError(f"{where}: 'mirror' must be an array of tables ([[registry.mirror]])")
    return RegistryEntry(
        prefix=prefix,
        location=location or prefix,
        insecure=_bool(table, "insecure", where),
        blocked=_bool(table, "blocked", where),
        mirror_by_digest_only=_bool(table, "mirror-by-digest-only", where),
        mirrors=tuple(_parse_mirror(m, f"{where} mirror #{n}") for n, m in enumerate(mirrors_table, 1)),
        origin=origin,
    )


def _parse_mirror(table: Any, where: str) -> Mirror:
    if not isinstance(table, dict):
        raise RegistriesConfError(f"{where} must be a table")
    mode = _string(table, "pull-from-mirror", where) or "all"
    if mode not in PULL_FROM_MIRROR_MODES:
        raise RegistriesConfError(
            f"{where}: pull-from-mirror must be one of {', '.join(PULL_FROM_MIRROR_MODES)}, not {mode!r}"
        )
    return Mirror(
        location=_location(table, "location", where, required=True),
        insecure=_bool(table, "insecure", where),
        pull_from_mirror=mode,
    )


def _location(table: dict[str, Any], key: str, where: str, required: bool) -> str:
    value = _string(table, key, where).rstrip("/")
    if required and not value:
        raise RegistriesConfError(f"{where}: {key} is required")
    if "://" in value:
        raise RegistriesConfError(f"{where}: {key} {value!r} must not contain a scheme (use insecure = true for http)")
    return value


def _string(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise RegistriesConfError(f"{where}: {key} must be a string")
    return value


def _bool(table: dict[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise RegistriesConfError(f"{where}: {key} must be true or false")
    return value


def _string_list(table: Any, key: str, where: str) -> list[str]:
    if not isinstance(table, dict):
        raise RegistriesConfError(f"{where} must be a table")
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RegistriesConfError(f"{where}: {key} must be a list of strings")
    return value
