// img2img's init image and the inpainting mask painted over it (white = repaint).

export class MaskPainter {
  constructor(wrap, imageCanvas, maskCanvas, brush) {
    this.wrap = wrap;
    this.image = imageCanvas;
    this.mask = maskCanvas;
    this.brush = brush;
    this.dataUrl = null;  // the init image as loaded
    this.painted = false;
    let last = null;
    const at = (e) => {
      const r = this.mask.getBoundingClientRect();
      return [(e.clientX - r.left) * this.mask.width / r.width, (e.clientY - r.top) * this.mask.height / r.height];
    };
    const paint = (e) => {
      const [x, y] = at(e);
      const ctx = this.mask.getContext("2d");
      const scale = this.mask.width / this.mask.getBoundingClientRect().width;
      ctx.strokeStyle = ctx.fillStyle = "#fff";
      ctx.lineCap = "round";
      ctx.lineWidth = Number(this.brush.value) * scale;
      ctx.beginPath();
      if (last) { ctx.moveTo(...last); ctx.lineTo(x, y); ctx.stroke(); }
      else { ctx.arc(x, y, ctx.lineWidth / 2, 0, 2 * Math.PI); ctx.fill(); }
      last = [x, y];
      this.painted = true;
    };
    this.mask.addEventListener("pointerdown", (e) => { this.mask.setPointerCapture(e.pointerId); last = null; paint(e); });
    this.mask.addEventListener("pointermove", (e) => { if (e.buttons) paint(e); });
    this.mask.addEventListener("pointerup", () => { last = null; });
  }

  async load(file) {
    this.dataUrl = await readDataUrl(file);
    const img = await loadImage(this.dataUrl);
    for (const c of [this.image, this.mask]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
    this.image.getContext("2d").drawImage(img, 0, 0);
    this.clear();
    this.wrap.hidden = false;
  }

  clear() {
    const ctx = this.mask.getContext("2d");
    ctx.clearRect(0, 0, this.mask.width, this.mask.height);
    this.painted = false;
  }

  async upload(file) {
    const img = await loadImage(await readDataUrl(file));
    const ctx = this.mask.getContext("2d");
    this.clear();
    ctx.drawImage(img, 0, 0, this.mask.width, this.mask.height);
    this.painted = true;
  }

  // The mask as A1111 takes it: a black image, white where to repaint (base64 PNG), or null.
  maskPng() {
    if (!this.painted) return null;
    const out = document.createElement("canvas");
    out.width = this.mask.width; out.height = this.mask.height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.drawImage(this.mask, 0, 0);
    return out.toDataURL("image/png");
  }
}

export function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("not an image the browser can read"));
    img.src = src;
  });
}
