"""
A tracker summary as text, exactly as TVM's C{query_rpc_tracker} prints it
(with the two fixes L{text_summary} names); apart from the tracker client, as
both it and the query tool use it and it speaks to nobody.
"""


def _served_keys(info_key):
    """
    The device keys one server-info entry serves.

    C{server:<key>} serves the whole key after C{server:} (which may hold
    C{:}); a proxy's C{server:proxy[k1,k2]} serves each key it lists.
    """
    prefix = "server:"
    key = info_key[len(prefix):] if info_key.startswith(prefix) else info_key
    if key.startswith("proxy[") and key.endswith("]"):
        return [k for k in key[len("proxy["):-1].split(",") if k]
    return [key]


def text_summary(summary):
    """
    Render a tracker summary as TVM's C{query_rpc_tracker} does.

    The text is TVM's to the byte, except that a proxy's entry
    C{server:proxy[k1,k2]} counts toward each listed key's total (TVM files it
    under the key C{proxy[k1,k2]}, so the proxied keys show total 0 and their
    rows vanish) and a key containing C{:} is counted whole (TVM keeps only
    the part up to its first C{:}).

    @param summary: the dict a SUMMARY returns (C{queue_info} and
        C{server_info}; other fields are ignored).
    @return: the text, ending with a newline.
    """
    totals = {}
    lines = [
        "Server List\n",
        "------------------------------\n",
        "server-address           key\n",
        "------------------------------\n",
    ]
    for item in sorted(summary["server_info"], key=lambda item: item["key"]):
        address = ":".join(map(str, item["addr"]))
        lines.append(f"{address:21s}    {item['key']}\n")
        for key in _served_keys(item["key"]):
            totals[key] = totals.get(key, 0) + 1
    lines.append("------------------------------\n")
    lines.append("\n")

    queue_info = summary["queue_info"]
    keys = sorted(queue_info)
    width = max((len(k) for k in keys), default=0)
    title = f"{'key':<{width}s}   total  free  pending\n"
    separator = "-" * len(title) + "\n"
    lines += ["Queue Status\n", separator, title, separator]
    for key in keys:
        total = totals.get(key, 0)
        free, pending = queue_info[key]["free"], queue_info[key]["pending"]
        if total or pending:
            lines.append(f"{key:<{width}}   {total:<5d}  {free:<4d}  {pending:<7d}\n")
    lines.append(separator)
    return "".join(lines)
