"""--columns: which data-set column fills which field (instruction, input, output, messages, text, or a custom
template's slot), parsed and applied in one place."""

from .errors import UserError


def parse_columns(columns) -> dict:
    """`--columns 'instruction=question,output=answer'` (or a dict from Fire) -> {field: column}."""
    if not columns:
        return {}
    if isinstance(columns, dict):
        return {str(k): str(v) for k, v in columns.items()}
    pairs = {}
    for part in str(columns).split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--columns {columns!r}: write FIELD=COLUMN pairs separated by commas, "
                            "e.g. --columns 'instruction=question,output=answer'.")
        pairs[key.strip()] = value.strip()
    return pairs


def apply_mapping(ds, mapping: dict, template_fields=None):
    """Renames data-set columns onto the fields the template and formats expect ({field: column}). Fields are
    checked once the template is known (template_fields; None: not yet, while the format picks the template)."""
    fields = {"instruction", "input", "output", "messages", "conversations", "text"} | set(template_fields or ())
    unknown = sorted(set(mapping) - fields) if template_fields is not None else []
    if unknown:  # a field nothing reads: its column would be dropped without a word
        raise UserError(f"--columns names {unknown}, which no format or template reads. Fields: "
                        f"{', '.join(sorted(fields))} (a custom template's {{slots}} too).")
    twice = sorted({col for col in mapping.values() if list(mapping.values()).count(col) > 1})
    if twice:  # a rename moves a column once: the second field would silently lose it
        raise UserError(f"--columns maps column(s) {twice} onto several fields "
                        f"({', '.join(f for f, c in mapping.items() if c in twice)}); a column fills one field. "
                        "Copy the column in the file under a second name to use it twice.")
    missing = [col for col in mapping.values() if col not in ds.column_names]
    if missing:
        raise UserError(f"--columns maps onto {missing}, which the data set lacks. Its columns are "
                        f"{ds.column_names}.")
    renames = {col: fld for fld, col in mapping.items() if col != fld}
    clash = [fld for col, fld in renames.items() if fld in ds.column_names and fld not in renames]
    if clash:
        ds = ds.remove_columns(clash)  # the user's mapping wins over a column that already had that name
    return ds.rename_columns(renames) if renames else ds
