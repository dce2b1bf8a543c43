"""atheris harness: request integrity (pep/integrity.py `path_problem`, `parameter_problem`, `query_problem`,
`method_override_field`, `override_header`, and pep/authority.py).

Input: text (UTF-8; bytes that are not become lone surrogates) in up to four lines: the raw path, the raw query,
an authority, and comma-separated header names. Oracles (fuzz/oracles.py):
- an accepted path is visible ASCII without `\\` or `#`, its escapes are well-formed and none encodes an
  unreserved character, and no segment is or decodes (byte by byte, up to 4 rounds) to a dot segment, a `/` or
  `\\`, or a control character; a segment still changing after 4 rounds is refused; no segment is empty but the
  last, nor empty before its parameters (`/;x/`);
- on an accepted path, a path parameter is refused exactly when a segment holds `;`, raw or after any decoding;
- an accepted query is visible ASCII without `#`; a `_method` field in it (as PHP reads names) is found exactly
  when present;
- a method- or path-override header is refused exactly when present, in any case;
- an authority splits into a non-empty lower-case host and a port in 1-65535, resolves with the explicit port
  or the default, and formats back to the same parts.
"""

from __future__ import annotations

from atheris.function_hooks import enabled_hooks
from atheris.import_hook import instrument_imports

from fuzz.harness import run

enabled_hooks.add("RegEx")
enabled_hooks.add("str")
with instrument_imports(include=["pep"]):
    from multidict import CIMultiDict

    from fuzz import oracles
    from pep.authority import format_authority, resolve_authority, split_authority
    from pep.integrity import method_override_field, override_header, parameter_problem, path_problem, query_problem


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    path, _, rest = text.partition("\n")
    query, _, rest = rest.partition("\n")
    authority, _, names_line = rest.partition("\n")
    problem = path_problem(path)
    oracles.check_path(path, problem)
    if problem is None:
        oracles.check_parameters(path, parameter_problem(path))
    oracles.check_query(query, query_problem(query))
    oracles.check_method_field(query, method_override_field(query))
    # Header names reach the PEP as HTTP tokens (ASCII): the HTTP parser refuses anything else first.
    names = [n for n in names_line.split(",") if n and n.isascii()]
    oracles.check_override(names, override_header(CIMultiDict((n, "") for n in names)))
    for default in (None, 80, 443):
        resolved = resolve_authority(authority, default)
        split = split_authority(authority)
        oracles.check_authority(authority, split, resolved, default, format_authority, split_authority)


if __name__ == "__main__":
    run(test_one_input)
