"""Human and JSON renderings of results."""
from __future__ import annotations

import json

import click

from ..units import format_size


def emit_json(doc) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def render_info(info: dict) -> str:
    lines = [f"image:        {info.get('path')}", f"format:       {info['format']}"
             + (f" {info['format_version']}" if info.get("format_version") else "")]
    lines.append(f"disk size:    {format_size(info['virtual_size'])} ({info['virtual_size']} bytes)")
    if info.get("file_size") is not None:  # a foreign image (qcow2, vhd, vhdx, vmdk)
        lines.append(f"file size:    {format_size(info['file_size'])}"
                     + (f" ({info['subformat']})" if info.get("subformat") else ""))
    if "stored_size" in info:
        lines.append(f"stored size:  {format_size(info['stored_size'])} (ratio {info['ratio']}x)")
        comp = info.get("compression") or {}
        lines.append(f"compression:  {comp.get('algorithm')} level {comp.get('level')}, "
                     f"{format_size(info['chunk_size'])} chunks ({info['chunks']['data']} stored, "
                     f"{info['chunks']['zero']} zero, {info['chunks']['free']} free)")
        if info["chunks"].get("parent"):
            lines[-1] += f", {info['chunks']['parent']} in parents"
        lines.append(f"encrypted:    {'yes' if info.get('encrypted') else 'no'}")
        if len(info.get("chain") or []) > 1:
            lines.append(f"chain:        {len(info['chain'])} links, {format_size(info['chain_stored_size'])} in all "
                         "(newest first; each link's own size)")
            for n, link in enumerate(info["chain"]):
                role = "full" if n == len(info["chain"]) - 1 else "incremental"
                lines.append(f"  {n + 1:>3}  {format_size(link['stored_size']):>10}  {role:<11}  "
                             f"{link['data_chunks']} stored, {link['parent_chunks']} from parent  "
                             f"{link.get('created') or ''}  {link['path']}")
        if len(info.get("volumes", [])) > 1:
            lines.append(f"volumes:      {len(info['volumes'])}")
        if info.get("stray_volume"):
            lines.append(f"  warning: {info['stray_volume']} is not a volume of this image "
                         f"(it has {len(info['volumes'])}); left over from another image?")
        lines.append(f"created:      {info.get('created')} by imgkit {info.get('imgkit_version')}")
        src = info.get("source") or {}
        lines.append(f"source:       {src.get('path')} ({src.get('kind')}"
                     + (f", {src['model']}" if src.get("model") else "") + ")")
    if info.get("os"):
        o = info["os"]
        where = f" (partition {o['partition']})" if o.get("partition") else ""
        lines.append(f"os:           {o.get('name') or o.get('id')}{where}")
    if info.get("optical"):
        o = info["optical"]
        lines.append(f"optical:      ISO 9660 volume {o.get('volume_id')!r}"
                     + (", El Torito bootable" if o.get("el_torito") else ""))
    pt = info.get("partition_table") or {}
    lines.append(f"partitions:   {pt.get('type', 'none')}" + (f" (disk id {pt['disk_id']})" if pt.get("disk_id") else ""))
    for p in pt.get("partitions", []):
        used = ""
        if p.get("used_bytes") is not None:
            used = f" used {format_size(p['used_bytes'])} of {format_size(p['size'])}"
        if p.get("capture_mode"):
            used += f" [{p['capture_mode']}]"
        label = f" '{p['label'] or p.get('name')}'" if (p.get("label") or p.get("name")) else ""
        lines.append(f"  {p['number']:>3}  start {p['start']:>14}  {format_size(p['size']):>10}  "
                     f"{p['type_name']:<22} {p.get('filesystem') or '-':<8}{label}{used}"
                     + (" *" if p.get("bootable") else ""))
    if not pt.get("partitions") and pt.get("capture_mode"):
        lines.append(f"  whole disk: {pt.get('filesystem') or '-'} used {format_size(pt.get('used_bytes') or 0)}"
                     f" [{pt['capture_mode']}]")
    for problem in pt.get("problems", []):
        lines.append(f"  warning: {problem}")
    return "\n".join(lines)
