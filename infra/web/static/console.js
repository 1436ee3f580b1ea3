// The operator console (admin keys): the queue (queue, queue_cancel), the models (get_all_models,
// load_model, verify_model, delete_model), per-key usage by day (usage: a chart, a table, CSV),
// and the server (system_details: device, memory, loaded models, storage without secrets).

import { call } from "./api.js";
import { COUNTERS, formatNumber, usageChart, usageCsv } from "./chart.js";
import { $, el, replaceChildren, say, tabs } from "./dom.js";
import { SchemaForm, requestModel } from "./forms.js";

const QUEUE_MS = 1500;
const MODELS_MS = 1000;
const HIDDEN_STORAGE_FIELDS = new Set(["secret_access_key"]);

export class Console {
  constructor(root, doc) {
    this.root = root;
    this.doc = doc;
    this.panel = "queue";
    this.active = false;
    this.loads = new Map(); // model_id -> when its load was asked for (ms)
    this.selectPanel = tabs($("#console-tabs", root), (name) => {
      this.panel = name;
      this.#refreshPanel();
    });
    this.loadForm = new SchemaForm($("#load-fields", root), requestModel(doc, "load_model").schema, {
      main: ["url", "model_id", "model_type"], skip: ["key"],
    });
    $("#load-form", root).addEventListener("submit", (event) => {
      event.preventDefault();
      this.load();
    });
    $("#usage-form", root).addEventListener("submit", (event) => {
      event.preventDefault();
      this.usage();
    });
    const metric = $("#usage-metric", root);
    metric.replaceChildren(...COUNTERS.map((c) => el("option", { value: c }, c.replace(/_/g, " "))));
    metric.value = "jobs_succeeded";
    metric.addEventListener("change", () => this.#drawUsage());
    const today = new Date().toISOString().slice(0, 10);
    $("#usage-start", root).value = `${today.slice(0, 8)}01`;
    $("#usage-end", root).value = today;
    $("#usage-csv", root).addEventListener("click", () => this.#downloadCsv());
    $("#queue-refresh", root).addEventListener("click", () => this.queue());
    $("#system-refresh", root).addEventListener("click", () => this.system());
    document.addEventListener("visibilitychange", () => this.#schedule());
  }

  show(active) {
    this.active = active;
    if (active) this.#refreshPanel();
    else this.#schedule();
  }

  #refreshPanel() {
    if (!this.active) return;
    ({ queue: () => this.queue(), models: () => this.models(), usage: () => this.usage(),
      system: () => this.system() })[this.panel]();
  }

  /** Poll what is live on the shown panel (the queue; loading models), only while it is seen. */
  #schedule() {
    clearTimeout(this.timer);
    if (!this.active || document.hidden) return;
    if (this.panel === "queue") this.timer = setTimeout(() => this.queue(), QUEUE_MS);
    else if (this.panel === "models" && this.loading) this.timer = setTimeout(() => this.models(), MODELS_MS);
  }

  // ------------------------------------------------------------------ queue

  async queue() {
    const status = $("#queue-status", this.root);
    try {
      const answer = await call("queue");
      this.#drawQueue(answer);
      say(status, `${answer.jobs.length} job(s) queued or running; updated ${new Date().toLocaleTimeString()}.`);
    } catch (error) {
      say(status, error.message, "error");
    }
    this.#schedule();
  }

  #drawQueue(answer) {
    const body = $("#queue-rows", this.root);
    replaceChildren(body, answer.jobs.map((job) => {
      const progress = job.progress || {};
      const cancel = el("button", { type: "button", class: "cancel", onclick: () => this.cancel(job.id, cancel) },
        "Cancel");
      cancel.setAttribute("aria-label", `Cancel job ${job.id}`);
      return el("tr", { dataset: { jobId: String(job.id), state: job.state } },
        el("td", {}, String(job.id)), el("td", { class: "mono" }, job.key_id), el("td", {}, job.endpoint),
        el("td", {}, job.model_id ?? ""), el("td", {}, job.priority),
        el("td", {}, job.state === "queued" && job.queue_position !== undefined && job.queue_position !== null
          ? `queued (${job.queue_position} ahead)` : job.state),
        el("td", {}, el("progress", { max: 100, value: progress.percent || 0, "aria-label": `Progress of job ${job.id}` }),
          ` ${progress.percent || 0} %`, progress.stage ? el("small", {}, ` ${progress.stage}`) : null),
        el("td", {}, job.eta !== undefined ? `${formatNumber(job.eta)} s` : ""),
        el("td", {}, cancel));
    }));
    $("#queue-empty", this.root).hidden = answer.jobs.length > 0;
    const keys = Object.entries(answer.by_key);
    replaceChildren($("#queue-keys", this.root), keys.map(([key, c]) => el("tr", {},
      el("td", { class: "mono" }, key), el("td", {}, String(c.running)), el("td", {}, String(c.queued)),
      el("td", {}, String(c.high)), el("td", {}, String(c.normal)), el("td", {}, String(c.low)))));
    const waiting = answer.queue_by_priority || {};
    $("#queue-priorities", this.root).textContent = `Waiting to start: high ${waiting.high || 0}, `
      + `normal ${waiting.normal || 0}, low ${waiting.low || 0}.`;
  }

  async cancel(id, button) {
    button.disabled = true;
    const status = $("#queue-status", this.root);
    try {
      const answer = await call("queue_cancel", { request_id: id });
      say(status, `Job ${id}: ${answer.message || answer.status}.`);
    } catch (error) {
      say(status, `Job ${id}: ${error.message}`, "error");
    }
    this.queue();
  }

  // ------------------------------------------------------------------ models

  async models() {
    const status = $("#models-status", this.root);
    try {
      const { models } = await call("get_all_models");
      this.loading = models.some((m) => m.status === "loading");
      this.#drawModels(models);
    } catch (error) {
      say(status, error.message, "error");
    }
    this.#schedule();
  }

  #drawModels(models) {
    replaceChildren($("#model-rows", this.root), models.map((model) => {
      const id = String(model.model_id);
      const note = el("span", { class: "note", role: "status" }, model.message || "");
      let state = el("span", { class: "badge", dataset: { state: model.status } }, model.status);
      if (model.status === "loading") {
        const since = this.loads.get(id);
        const seconds = since ? ` ${Math.round((Date.now() - since) / 1000)} s` : "";
        state = el("span", {}, el("progress", { "aria-label": `Loading ${id}` }), ` loading${seconds}`);
      }
      const verify = el("button", { type: "button", onclick: () => this.verify(id, note) }, "Verify");
      const remove = el("button", { type: "button", class: "danger", onclick: () => this.remove(id, remove, note) },
        "Delete");
      verify.setAttribute("aria-label", `Verify ${id}`);
      remove.setAttribute("aria-label", `Delete ${id}`);
      return el("tr", { dataset: { modelId: id, status: model.status } },
        el("td", {}, id), el("td", {}, model.category || ""), el("td", {}, model.family || ""),
        el("td", {}, state), el("td", {}, model.load_data || ""),
        el("td", {}, el("div", { class: "row-actions" }, verify, model.status === "loading" ? null : remove, note)));
    }));
  }

  async load() {
    const status = $("#load-status", this.root);
    if (!this.loadForm.check()) return;
    const body = this.loadForm.values();
    try {
      const answer = await call("load_model", body);
      this.loads.set(String(answer.model_id ?? body.model_id), Date.now());
      say(status, `${answer.message}: ${answer.model_id ?? body.model_id}.`);
      this.loadForm.reset();
    } catch (error) {
      say(status, error.message, "error");
    }
    this.models();
  }

  async verify(id, note) {
    try {
      const answer = await call("verify_model", { model_id: id });
      note.textContent = answer.message;
    } catch (error) {
      note.textContent = error.message;
    }
  }

  async remove(id, button, note) {
    if (button.dataset.confirm !== "yes") { // a second press deletes
      button.dataset.confirm = "yes";
      button.textContent = "Delete: sure?";
      return;
    }
    button.disabled = true;
    try {
      const answer = await call("delete_model", { model_id: id });
      say($("#models-status", this.root), `${answer.message}: ${id}.`);
      this.models();
    } catch (error) {
      note.textContent = error.message;
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------------ usage

  async usage() {
    const status = $("#usage-status", this.root);
    try {
      this.usageAnswer = await call("usage", {
        start_date: $("#usage-start", this.root).value || undefined,
        end_date: $("#usage-end", this.root).value || undefined,
        by_day: "yes",
      });
      this.#drawUsage();
      say(status, `${this.usageAnswer.keys.length} key(s), ${this.usageAnswer.start_date} to ${this.usageAnswer.end_date}.`);
    } catch (error) {
      say(status, error.message, "error");
    }
  }

  #drawUsage() {
    const usage = this.usageAnswer;
    if (!usage) return;
    const metric = $("#usage-metric", this.root).value;
    replaceChildren($("#usage-chart", this.root), usageChart(usage, metric));
    replaceChildren($("#usage-rows", this.root), usage.keys.map((key) => el("tr", {},
      el("td", { class: "mono" }, key.key_id), ...COUNTERS.map((c) => el("td", {}, formatNumber(key.total[c] || 0))))));
    $("#usage-csv", this.root).disabled = false;
  }

  #downloadCsv() {
    if (!this.usageAnswer) return;
    const blob = new Blob([usageCsv(this.usageAnswer)], { type: "text/csv" });
    const link = el("a", { href: URL.createObjectURL(blob),
      download: `usage-${this.usageAnswer.start_date}-${this.usageAnswer.end_date}.csv` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  }

  // ------------------------------------------------------------------ system and storage

  async system() {
    const status = $("#system-status", this.root);
    try {
      const details = await call("system_details");
      const storage = details.storage || {};
      replaceChildren($("#storage", this.root), definitions({
        kind: storage.kind || (storage.bucket ? "S3 bucket" : "local"),
        ...Object.fromEntries(Object.entries(storage).filter(([k]) => k !== "kind" && !HIDDEN_STORAGE_FIELDS.has(k))),
      }));
      replaceChildren($("#system", this.root), definitions({
        device: details.device, version: details.version,
        "memory (MiB)": details.memory_mb ?? "unknown",
        "jobs queued or running": details.queue_num, "queued work (s)": details.queue_time,
        "models in the store": (details.models || []).join(", "),
        "models in memory": (details.loaded_models || []).join(", ") || "none",
      }));
      replaceChildren($("#memory", this.root), definitions(details.memory?.settings || {}));
      say(status, `Updated ${new Date().toLocaleTimeString()}.`);
    } catch (error) {
      say(status, error.message, "error");
    }
  }
}

function definitions(entries) {
  const list = el("dl", { class: "facts" });
  for (const [name, value] of Object.entries(entries)) {
    list.append(el("dt", {}, name), el("dd", {}, typeof value === "object" && value !== null ? JSON.stringify(value)
      : String(value ?? "")));
  }
  return list;
}
