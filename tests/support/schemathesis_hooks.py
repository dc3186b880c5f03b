"""schemathesis hooks for `sdengine serve`'s schema (SCHEMATHESIS_HOOKS=support.schemathesis_hooks):
strings of the format "base64-image" are drawn as what the format says, small images PIL
can read, base64-encoded (some as data: URLs)."""

import base64
import io

import schemathesis
from hypothesis import strategies as st


def _png(width: int, height: int, color: tuple, mode: str, data_url: bool) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height), color[:len(mode)]).save(buf, format="PNG")
    encoded = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"data:image/png;base64,{encoded}" if data_url else encoded


IMAGES = st.builds(_png, st.integers(1, 48), st.integers(1, 48), st.tuples(*[st.integers(0, 255)] * 4),
                   st.sampled_from(["RGB", "RGBA", "L"]), st.booleans())

schemathesis.openapi.format("base64-image", IMAGES)
