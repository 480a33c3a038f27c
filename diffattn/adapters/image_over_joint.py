"""Models whose attention takes image queries over ``[text, image]`` or ``[image, text]`` keys (the text gives keys and
values but no queries, and has no stream of its own): PRX (``PRXAttnProcessor2_0``, ``transformer_prx.py`` line
146: ``k = torch.cat((txt_k, img_k), dim=2)`` with ``query = img_q``) and Nucleus-MoE Image
(``NucleusMoEAttnProcessor2_0``, ``transformer_nucleusmoe_image.py`` line 317: ``joint_key = torch.cat([img_key,
txt_key], dim=1)`` with ``img_query``). Neither self (keys = the grid), cross (keys = text only) nor joint (queries
and keys the same sequence) describes these calls, so diffattn refuses them."""

from __future__ import annotations

_REASON = (
    "its attention takes image queries over {order} keys (the text gives keys but no queries), which none of "
    "diffattn's self / cross / joint layouts describes"
)

REFUSED = {
    "PRXTransformer2DModel": _REASON.format(order="[text, image]"),
    "NucleusMoEImageTransformer2DModel": _REASON.format(order="[image, text]"),
}
