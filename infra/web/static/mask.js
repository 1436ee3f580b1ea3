// The mask painter: a canvas of the init image's own size laid over it, painted with the pointer
// (mouse, pen or touch). Brush and eraser, brush size, clear, invert, and a feather (soft edge)
// shown in a preview of the mask exactly as it will be sent. The mask sent is a PNG of the image's
// size: white (repaint) where the strokes cover at least half a pixel, black (keep) elsewhere,
// then blurred by the feather radius when one is set (0: a hard-edged mask).

import { el, uid } from "./dom.js";

const TINT = "rgb(255, 64, 96)"; // how strokes look over the image (only their coverage is sent)

export class MaskPainter {
  constructor(root) {
    this.root = root;
    this.image = el("img", { class: "base", alt: "The init image" });
    this.canvas = el("canvas", { class: "paint", "aria-label": "Mask: paint the area to repaint", role: "img" });
    this.ctx = this.canvas.getContext("2d", { willReadFrequently: true });
    this.preview = el("canvas", { class: "mask-preview", role: "img", "aria-label": "The mask as it will be sent" });
    this.tool = "brush";
    this.size = 16;
    this.feather = 0;
    this.last = null;
    this.width = 0;
    this.height = 0;
    const sizeId = uid("brush-size");
    const featherId = uid("feather");
    this.brushButton = el("button", { type: "button", "aria-pressed": "true", onclick: () => this.setTool("brush") }, "Brush");
    this.eraserButton = el("button", { type: "button", "aria-pressed": "false", onclick: () => this.setTool("eraser") }, "Eraser");
    this.sizeInput = el("input", { type: "range", id: sizeId, min: 1, max: 128, value: this.size });
    this.sizeOutput = el("output", { for: sizeId }, String(this.size));
    this.sizeInput.addEventListener("input", () => {
      this.size = Number(this.sizeInput.value);
      this.sizeOutput.textContent = String(this.size);
    });
    this.featherInput = el("input", { type: "range", id: featherId, min: 0, max: 32, value: 0 });
    this.featherOutput = el("output", { for: featherId }, "0");
    this.featherInput.addEventListener("input", () => {
      this.feather = Number(this.featherInput.value);
      this.featherOutput.textContent = String(this.feather);
      this.#drawPreview();
    });
    const group = (...items) => el("span", { class: "group" }, ...items);
    const toolbar = el("div", { class: "toolbar", role: "toolbar", "aria-label": "Mask tools" },
      group(this.brushButton, this.eraserButton),
      group(el("label", { for: sizeId }, "Size"), this.sizeInput, this.sizeOutput),
      group(el("button", { type: "button", onclick: () => this.clear() }, "Clear"),
        el("button", { type: "button", onclick: () => this.invert() }, "Invert")),
      group(el("label", { for: featherId }, "Feather"), this.featherInput, this.featherOutput));
    this.stage = el("div", { class: "stage" }, this.image, this.canvas);
    root.replaceChildren(toolbar, this.stage,
      el("figure", { class: "preview-figure" }, this.preview, el("figcaption", {}, "Mask sent (white = repaint)")));
    this.canvas.addEventListener("pointerdown", (e) => this.#down(e));
    this.canvas.addEventListener("pointermove", (e) => this.#move(e));
    for (const type of ["pointerup", "pointercancel"]) this.canvas.addEventListener(type, (e) => this.#up(e));
  }

  /** Paint over this image (a data: URI) of `width` x `height` pixels; the mask starts empty. */
  setImage(src, width, height) {
    this.image.src = src;
    this.width = width;
    this.height = height;
    for (const canvas of [this.canvas, this.preview]) {
      canvas.width = width;
      canvas.height = height;
    }
    this.stage.style.aspectRatio = `${width} / ${height}`;
    this.clear();
  }

  setTool(tool) {
    this.tool = tool;
    this.brushButton.setAttribute("aria-pressed", String(tool === "brush"));
    this.eraserButton.setAttribute("aria-pressed", String(tool === "eraser"));
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.#drawPreview();
  }

  invert() {
    const flipped = el("canvas", { width: this.canvas.width, height: this.canvas.height });
    const c = flipped.getContext("2d");
    c.fillStyle = TINT;
    c.fillRect(0, 0, flipped.width, flipped.height);
    c.globalCompositeOperation = "destination-out";
    c.drawImage(this.canvas, 0, 0);
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.ctx.drawImage(flipped, 0, 0);
    this.#drawPreview();
  }

  /** Paint from a mask sent earlier (a data: URI of the image's size): white becomes painted. */
  setMask(src) {
    return new Promise((resolve) => {
      const mask = new Image();
      mask.onload = () => {
        const read = el("canvas", { width: this.canvas.width, height: this.canvas.height });
        const r = read.getContext("2d", { willReadFrequently: true });
        r.drawImage(mask, 0, 0, read.width, read.height);
        const source = r.getImageData(0, 0, read.width, read.height).data;
        const painted = this.ctx.createImageData(read.width, read.height);
        for (let i = 0; i < source.length; i += 4) {
          if (source[i] >= 128) painted.data.set([255, 64, 96, 255], i);
        }
        this.ctx.putImageData(painted, 0, 0);
        this.#drawPreview();
        resolve();
      };
      mask.onerror = () => resolve();
      mask.src = src;
    });
  }

  /** Whether anything is painted. */
  get painted() {
    return this.#coverage().some((on) => on);
  }

  /** The mask as a PNG data: URI of the image's size (see the module comment). */
  maskDataUrl() {
    return this.#maskCanvas().toDataURL("image/png");
  }

  #coverage() {
    if (!this.canvas.width) return [];
    const { data } = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height);
    const on = new Array(data.length / 4);
    for (let i = 0; i < on.length; i += 1) on[i] = data[i * 4 + 3] >= 128;
    return on;
  }

  #maskCanvas() {
    const hard = el("canvas", { width: this.canvas.width, height: this.canvas.height });
    const c = hard.getContext("2d");
    const pixels = c.createImageData(hard.width, hard.height);
    this.#coverage().forEach((on, i) => {
      const value = on ? 255 : 0;
      pixels.data.set([value, value, value, 255], i * 4);
    });
    c.putImageData(pixels, 0, 0);
    if (!this.feather) return hard;
    const soft = el("canvas", { width: hard.width, height: hard.height });
    const s = soft.getContext("2d");
    s.fillStyle = "black";
    s.fillRect(0, 0, soft.width, soft.height);
    s.filter = `blur(${this.feather}px)`;
    s.drawImage(hard, 0, 0);
    return soft;
  }

  #drawPreview() {
    if (!this.preview.width) return;
    const c = this.preview.getContext("2d");
    c.clearRect(0, 0, this.preview.width, this.preview.height);
    c.drawImage(this.#maskCanvas(), 0, 0);
  }

  #point(event) {
    const rect = this.canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * this.canvas.width) / rect.width,
      y: ((event.clientY - rect.top) * this.canvas.height) / rect.height,
    };
  }

  #paint(from, to) {
    const c = this.ctx;
    c.globalCompositeOperation = this.tool === "eraser" ? "destination-out" : "source-over";
    c.strokeStyle = c.fillStyle = TINT;
    c.lineWidth = this.size;
    c.lineCap = "round";
    c.lineJoin = "round";
    if (from.x === to.x && from.y === to.y) {
      c.beginPath();
      c.arc(to.x, to.y, this.size / 2, 0, Math.PI * 2);
      c.fill();
    } else {
      c.beginPath();
      c.moveTo(from.x, from.y);
      c.lineTo(to.x, to.y);
      c.stroke();
    }
  }

  #down(event) {
    if (!this.width || event.button > 0) return;
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    this.last = this.#point(event);
    this.#paint(this.last, this.last);
  }

  #move(event) {
    if (!this.last) return;
    const point = this.#point(event);
    this.#paint(this.last, point);
    this.last = point;
  }

  #up(event) {
    if (!this.last) return;
    this.#move(event);
    this.last = null;
    if (this.canvas.hasPointerCapture(event.pointerId)) this.canvas.releasePointerCapture(event.pointerId);
    this.#drawPreview();
  }
}
