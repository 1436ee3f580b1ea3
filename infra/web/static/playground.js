// The playground: text2img, img2img, inpaint and controlnet forms made from their request models,
// the model and scheduler pickers filled from get_all_models and schedulers_list, an image drop
// zone and the mask painter; each job a card in the gallery that follows it live (stream, else
// polling), can be cancelled, and ends with its images, seed and meta, "reuse these settings" and
// the exact request as curl or Python.

import { call, follow, messageOf } from "./api.js";
import { $, copyText, el, replaceChildren, say, tabs } from "./dom.js";
import { SchemaForm, readDataUrl, requestModel } from "./forms.js";
import { MaskPainter } from "./mask.js";
import { curlSnippet, pythonSnippet } from "./snippets.js";

export const TASKS = ["text2img", "img2img", "inpaint", "controlnet"];
const NEEDS_IMAGE = { img2img: "required", inpaint: "required", controlnet: "optional" };
const MASK = { inpaint: "required", controlnet: "optional" };
const MAIN = ["prompt", "negative_prompt", "model_id", "controlnet_model", "controlnet_type", "control_image",
  "auto_hint", "width", "height", "samples", "num_inference_steps", "guidance_scale", "strength", "seed", "scheduler"];
// the page's own defaults: answer at once and follow the job live, with previews
const PAGE_DEFAULTS = { instant_response: "yes", preview: "yes" };
// catalog categories that are not pipelines (offered in their own fields, not as model_id)
const ADD_ONS = { lora: "lora_model", controlnet: "controlnet_model", embeddings: "embeddings_model", vae: "vae",
  ip_adapter: "ip_adapter_id" };
const NOT_PIPELINES = new Set([...Object.keys(ADD_ONS), "preprocessor", "upscaler", "face_restorer",
  "motion_adapter", "translator", "segmenter", "image_to_video"]);
const IMAGE_URL = /\.(png|jpe?g|webp|gif)(\?|$)/i;

export class Playground {
  constructor(root, doc) {
    this.root = root;
    this.doc = doc;
    this.forms = {};
    this.cards = new Set(); // the jobs being followed
    this.task = "text2img";
    this.image = null; // {src, width, height} of the init image
    this.status = $("#play-status", root);
    this.gallery = $("#gallery", root);
    this.painter = new MaskPainter($("#painter", root));
    this.#dropZone();
    this.selectTask = tabs($("#task-tabs", root), (name) => this.#showTask(name));
    this.selectTask("text2img");
    $("#gen-form", root).addEventListener("submit", (event) => {
      event.preventDefault();
      this.generate();
    });
  }

  /** (Re)build the forms with the server's models and schedulers. */
  async refresh() {
    const [models, schedulers] = await Promise.all([call("get_all_models"), call("schedulers_list")]);
    const ready = models.models.filter((m) => m.status === "ready");
    const pipelines = ready.filter((m) => !NOT_PIPELINES.has(m.category)).map((m) => String(m.model_id));
    const suggestions = {};
    for (const [category, field] of Object.entries(ADD_ONS)) {
      suggestions[field] = ready.filter((m) => m.category === category).map((m) => String(m.model_id));
    }
    for (const task of TASKS) {
      const { schema } = requestModel(this.doc, task);
      const previous = this.forms[task]?.values();
      this.forms[task] = new SchemaForm($(`#fields-${task}`, this.root), schema, {
        main: MAIN,
        skip: ["key", "init_image", ...(MASK[task] ? ["mask_image"] : [])],
        defaults: PAGE_DEFAULTS,
        choices: { model_id: pipelines, scheduler: schedulers.schedulers },
        blank: { model_id: "(server default)", scheduler: "(the model's own)" },
        suggestions,
      });
      if (previous) this.forms[task].fill(previous);
    }
  }

  #showTask(name) {
    this.task = name;
    const needs = NEEDS_IMAGE[name];
    $("#image-area", this.root).hidden = !needs;
    $("#drop-label", this.root).textContent = needs === "optional"
      ? "Init image (optional: the hint when there is no control_image)" : "Init image";
    $("#painter", this.root).hidden = !(MASK[name] && this.image);
    $("#mask-note", this.root).textContent = MASK[name] === "optional"
      ? "Paint a mask to inpaint with the ControlNet (optional)." : MASK[name] ? "Paint the area to repaint." : "";
  }

  #dropZone() {
    const zone = $("#drop-zone", this.root);
    const input = $("#init-file", this.root);
    input.addEventListener("change", () => input.files[0] && this.#loadFile(input.files[0]));
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      const file = [...(event.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/"));
      if (file) this.#loadFile(file);
    });
  }

  async #loadFile(file) {
    this.setImage(await readDataUrl(file));
  }

  /** Use this image (a data: URI) as the init image. */
  setImage(src) {
    return new Promise((resolve) => {
      const probe = new Image();
      probe.onload = () => {
        this.image = { src, width: probe.naturalWidth, height: probe.naturalHeight };
        this.painter.setImage(src, probe.naturalWidth, probe.naturalHeight);
        const thumb = $("#init-thumb", this.root);
        thumb.src = src;
        thumb.hidden = false;
        $("#init-size", this.root).textContent = `${probe.naturalWidth} x ${probe.naturalHeight}`;
        this.#showTask(this.task);
        resolve();
      };
      probe.onerror = () => {
        say(this.status, "That file is not an image this browser can read.", "error");
        resolve();
      };
      probe.src = src;
    });
  }

  /** Submit the current form; the job's card follows it. */
  async generate() {
    const task = this.task;
    const form = this.forms[task];
    if (!form || !form.check()) return;
    const body = form.values();
    if (NEEDS_IMAGE[task] === "required" && !this.image) {
      say(this.status, "Choose or drop an init image first.", "error");
      return;
    }
    if (this.image && NEEDS_IMAGE[task]) body.init_image = this.image.src;
    if (MASK[task] === "required" || (MASK[task] && this.painter.painted)) {
      if (!this.painter.painted) {
        say(this.status, "Paint the area to repaint on the image first.", "error");
        return;
      }
      body.mask_image = this.painter.maskDataUrl();
    }
    const url = new URL(`/api/v1/enterprise/${task}`, window.location.href).href;
    const card = new JobCard(this, task, url, body);
    this.gallery.prepend(card.node);
    card.node.scrollIntoView({ block: "nearest" }); // below the form on a phone
    say(this.status, `${task} sent.`);
    this.cards.add(card);
    await card.run();
    this.cards.delete(card);
  }

  /** Forget the results shown (the key changes). */
  clear() {
    for (const card of this.cards) card.controller.abort();
    this.cards.clear();
    this.gallery.replaceChildren();
    say(this.status, "");
  }

  /** Fill the task's form from a request body sent earlier (and the seed it ran with). */
  async reuse(task, body, seed) {
    this.selectTask(task);
    const settings = { ...body };
    if (seed !== undefined && seed !== null) settings.seed = seed;
    this.forms[task].fill(settings);
    if (body.init_image) await this.setImage(body.init_image);
    if (body.mask_image) await this.painter.setMask(body.mask_image);
    say(this.status, `The settings of that ${task} are in the form${seed !== undefined ? ` (seed ${seed})` : ""}.`);
    $(`#fields-${task} [name=prompt]`, this.root)?.focus();
  }
}

/** One job in the gallery: its progress while it runs, then its result. */
class JobCard {
  constructor(playground, task, url, body) {
    this.playground = playground;
    this.task = task;
    this.url = url;
    this.body = body;
    this.controller = new AbortController();
    this.title = el("h3", {}, `${task}`);
    this.badge = el("span", { class: "badge", dataset: { state: "sending" } }, "sending");
    this.bar = el("progress", { max: 100, value: 0, "aria-label": `Progress of this ${task}` });
    this.percent = el("span", { class: "percent" }, "0 %");
    this.stage = el("span", { class: "stage-text" }, "");
    this.preview = el("img", { class: "live-preview", alt: "Preview of the image being made", hidden: true });
    this.cancelButton = el("button", { type: "button", class: "cancel", disabled: true, onclick: () => this.cancel() },
      "Cancel");
    this.progress = el("div", { class: "job-progress" }, this.bar, this.percent, this.stage, this.cancelButton);
    this.images = el("div", { class: "images" });
    this.details = el("div", { class: "details" });
    this.node = el("article", { class: "card", "aria-live": "polite" },
      el("header", {}, this.title, this.badge), this.progress, this.preview, this.images, this.details);
  }

  async run() {
    let answer;
    try {
      answer = await call(this.task, this.body, { signal: this.controller.signal });
    } catch (error) {
      this.#failed(error.message || messageOf(error.body));
      this.#tools(null);
      return;
    }
    this.id = answer.id;
    this.node.dataset.jobId = String(answer.id);
    this.title.textContent = `${this.task} #${answer.id}`;
    if (answer.status === "processing") {
      this.#update(answer);
      this.cancelButton.disabled = false;
      try {
        answer = await follow(answer.id, (body) => this.#update(body), {
          signal: this.controller.signal,
          how: (how) => { this.node.dataset.followedBy = how; },
        });
      } catch (error) {
        this.#failed(error.message);
        this.#tools(null);
        return;
      }
    }
    this.#done(answer);
  }

  async cancel() {
    this.cancelButton.disabled = true;
    this.stage.textContent = "cancelling";
    try {
      await call("cancel", { request_id: this.id });
    } catch (error) {
      this.stage.textContent = error.message;
    }
  }

  #update(body) {
    const progress = body.progress || {};
    const percent = Math.max(Number(this.bar.value), Number(progress.percent || 0));
    this.bar.value = percent;
    this.percent.textContent = `${percent} %`;
    this.badge.textContent = progress.stage === "queued" ? "queued" : "running";
    this.badge.dataset.state = this.badge.textContent;
    const where = body.queue_position ? `, ${body.queue_position} ahead` : "";
    this.stage.textContent = progress.stage
      ? `${progress.stage}${progress.total_steps ? `, step ${progress.step}/${progress.total_steps}` : ""}${where}`
      : "";
    if (progress.preview && progress.stage === "denoising") {
      this.preview.src = progress.preview;
      this.preview.hidden = false;
    }
  }

  #hidePreview() {
    this.preview.hidden = true;
    this.preview.removeAttribute("src");
  }

  #failed(message) {
    this.#hidePreview();
    this.cancelButton.hidden = true;
    this.badge.textContent = "failed";
    this.badge.dataset.state = "failed";
    this.stage.textContent = "";
    this.images.replaceChildren(el("p", { class: "error", role: "alert" }, message));
  }

  #done(answer) {
    this.#hidePreview();
    if (answer.status !== "success") {
      this.#failed(answer.message || "Failed");
      if (answer.cancelled) {
        this.badge.textContent = "cancelled";
        this.badge.dataset.state = "cancelled";
      }
      this.#tools(answer);
      return;
    }
    this.bar.value = 100;
    this.percent.textContent = "100 %";
    this.stage.textContent = answer.generationTime ? `done in ${answer.generationTime} s` : "done";
    this.cancelButton.hidden = true;
    this.badge.textContent = "success";
    this.badge.dataset.state = "success";
    const outputs = [].concat(answer.output || []);
    const prompt = answer.meta?.prompt ? `: ${answer.meta.prompt}` : "";
    replaceChildren(this.images, outputs.map((link, i) => el("a", { href: link, target: "_blank", rel: "noopener" },
      IMAGE_URL.test(link)
        ? el("img", { src: link, alt: `Result ${i + 1} of ${outputs.length}${prompt}`, loading: "lazy" })
        : `Output ${i + 1}`)));
    this.#tools(answer);
  }

  #tools(answer) {
    const meta = answer?.meta || {};
    const seed = meta.seed;
    const list = el("dl", { class: "meta" });
    for (const [name, value] of Object.entries(meta)) {
      const text = typeof value === "object" && value !== null ? JSON.stringify(value) : String(value);
      list.append(el("dt", {}, name), el("dd", {}, text.length > 300 ? `${text.slice(0, 300)}…` : text));
    }
    const snippet = el("textarea", { class: "snippet", readonly: true, rows: 8, hidden: true,
      "aria-label": "The request, to copy" });
    const copyStatus = el("span", { class: "copy-status", role: "status" });
    const show = async (text, what) => {
      snippet.value = text;
      snippet.hidden = false;
      snippet.dataset.kind = what;
      const copied = await copyText(text);
      copyStatus.textContent = copied ? `${what} copied` : `${what} below: select it and copy`;
      if (!copied) snippet.select();
    };
    replaceChildren(this.details,
      seed !== undefined ? el("p", { class: "seed" }, "seed ", el("strong", {}, String(seed))) : null,
      Object.keys(meta).length ? el("details", {}, el("summary", {}, "meta"), list) : null,
      el("div", { class: "buttons" },
        el("button", { type: "button", onclick: () => this.playground.reuse(this.task, this.body, seed) },
          "Reuse these settings"),
        el("button", { type: "button", onclick: () => show(curlSnippet(this.url, this.body), "curl") }, "Copy as curl"),
        el("button", { type: "button", onclick: () => show(pythonSnippet(this.url, this.body), "Python") },
          "Copy as Python"),
        copyStatus),
      snippet);
  }
}
