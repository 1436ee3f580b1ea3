// Forms made from the request models of the OpenAPI document: one input per field of the model,
// its kind read from the field's JSON schema (a flag, a choice, a number in a range, a list, an
// image, text), its label, help, default and range from the schema too. A field added to a
// request model shows up here with no edit to the page.

import { API } from "./api.js";
import { el, uid } from "./dom.js";

/** The request model of `endpoint`: {name, schema} from the OpenAPI document. */
export function requestModel(doc, endpoint) {
  const operation = doc.paths[`${API}/${endpoint}`]?.post;
  const ref = operation?.requestBody?.content?.["application/json"]?.schema?.$ref;
  if (!ref) throw new Error(`The OpenAPI document has no request model for ${endpoint}`);
  const name = ref.split("/").pop();
  return { name, schema: doc.components.schemas[name] };
}

function flatOptions(property) {
  const options = property.anyOf || [property];
  return options.flatMap((option) => (option.anyOf ? flatOptions(option) : [option]));
}

/** How a field is edited, from its schema. */
export function kindOf(name, property) {
  const options = flatOptions(property);
  if (options.some((o) => o.type === "boolean")) return { kind: "flag" };
  const choices = property.enum || options.find((o) => Array.isArray(o.enum) && o.type === "string")?.enum;
  if (choices) return { kind: "choice", values: choices };
  if (/(^|_)images?(_\d+)?$/.test(name)) return { kind: "image", list: options.some((o) => o.type === "array") };
  if (options.some((o) => o.type === "array")) return { kind: "list" };
  // a number that may also be sent as a string lists the number first; free text (which may also be
  // sent as a number) lists the string first
  const number = options.find((o) => o.type !== "null");
  if (number && (number.type === "integer" || number.type === "number")) {
    return { kind: "number", integer: number.type === "integer", min: number.minimum, max: number.maximum };
  }
  const examples = options.find((o) => Array.isArray(o.examples))?.examples;
  return { kind: "text", long: /prompt/.test(name), examples };
}

function isYes(value) {
  return value === true || value === 1 || /^(yes|true|1|y|on)$/i.test(String(value ?? "").trim());
}

/**
 * A form for a request model, in `container`: the fields named in `main` first (in that order),
 * the others in a "More options" disclosure. Options: `skip` (names handled by the page, e.g. the
 * key or the images the painter makes), `defaults` (the page's own defaults), `choices` (name ->
 * [values] for pickers filled from the API: models, schedulers), `blank` (name -> the label of
 * "not sent"), `suggestions` (name -> [values] offered for a free-text field: LoRA ids, ...).
 */
export class SchemaForm {
  constructor(container, schema, { main = [], skip = [], defaults = {}, choices = {}, blank = {}, suggestions = {} } = {}) {
    this.schema = schema;
    this.fields = new Map();
    this.defaults = defaults;
    const required = new Set(schema.required || []);
    const names = Object.keys(schema.properties || {}).filter((n) => !skip.includes(n));
    const first = main.filter((n) => names.includes(n));
    const rest = names.filter((n) => !first.includes(n));
    const mainBox = el("div", { class: "fields" });
    const more = el("div", { class: "fields" });
    for (const name of [...first, ...rest]) {
      const field = this.#field(name, schema.properties[name], required.has(name), choices[name], blank[name],
        suggestions[name]);
      field.main = first.includes(name);
      this.fields.set(name, field);
      (field.main ? mainBox : more).append(field.row);
    }
    container.replaceChildren(mainBox);
    if (rest.length) {
      container.append(el("details", { class: "more" },
        el("summary", {}, `More options (${rest.length})`), more));
    }
    this.reset();
  }

  #field(name, property, required, choices, blank, suggested) {
    const id = uid(`f-${name}`);
    const kind = choices ? { kind: "choice", values: choices } : kindOf(name, property);
    const help = property.description ? el("small", { id: `${id}-help`, class: "help" }, property.description) : null;
    const label = el("label", { for: id }, property.title || name, required ? el("span", { class: "req", "aria-hidden": "true" }, " *") : null);
    const describedBy = help ? `${id}-help` : undefined;
    let input;
    const extra = [];
    if (kind.kind === "flag") {
      input = el("input", { type: "checkbox", id, name, "aria-describedby": describedBy });
      const row = el("div", { class: "field flag", dataset: { field: name } }, input, label, help);
      return { name, kind, input, row, property, required };
    }
    if (kind.kind === "choice") {
      input = el("select", { id, name, required, "aria-describedby": describedBy });
      if (!required || blank) input.append(el("option", { value: "" }, blank || "(not sent)"));
      for (const value of kind.values) input.append(el("option", { value }, value));
    } else if (kind.kind === "number") {
      input = el("input", {
        type: "number", id, name, required, min: kind.min, max: kind.max, step: kind.integer ? 1 : "any",
        inputmode: kind.integer ? "numeric" : "decimal", "aria-describedby": describedBy,
      });
    } else if (kind.kind === "text" && kind.long) {
      input = el("textarea", { id, name, required, rows: name === "prompt" ? 3 : 2, "aria-describedby": describedBy });
    } else {
      input = el("input", { type: "text", id, name, required, autocomplete: "off", "aria-describedby": describedBy });
      const offered = suggested || (kind.kind === "text" ? kind.examples : null);
      if (offered?.length) {
        const list = el("datalist", { id: `${id}-list` }, offered.map((v) => el("option", { value: v })));
        input.setAttribute("list", list.id);
        extra.push(list);
      }
      if (kind.kind === "image") {
        input.placeholder = "URL or data: URI";
        const file = el("input", { type: "file", accept: "image/*", "aria-label": `${property.title || name}: choose a file` });
        file.addEventListener("change", async () => {
          if (file.files[0]) input.value = await readDataUrl(file.files[0]);
        });
        extra.push(file);
      } else if (kind.kind === "list") {
        input.placeholder = "comma-separated";
      }
    }
    if (property.default !== undefined && property.default !== null && !Array.isArray(property.default)
        && kind.kind !== "choice" && !required) {
      input.placeholder = String(property.default);
    }
    const row = el("div", { class: `field ${kind.kind}`, dataset: { field: name } }, label, input, ...extra, help);
    return { name, kind, input, row, property, required };
  }

  /** The default of a field: the page's, else the schema's. */
  defaultOf(field) {
    if (field.name in this.defaults) return this.defaults[field.name];
    const value = field.property.default;
    return Array.isArray(value) ? value.join(",") : value;
  }

  /** Every field back to its default. */
  reset() {
    for (const field of this.fields.values()) this.#set(field, this.defaultOf(field));
  }

  /** The fields set from a request body (what is not in it: its default). */
  fill(body) {
    for (const field of this.fields.values()) {
      this.#set(field, field.name in body ? body[field.name] : this.defaultOf(field));
    }
  }

  #set(field, value) {
    if (field.kind.kind === "flag") {
      field.input.checked = isYes(value);
    } else if (field.kind.kind === "choice") {
      const text = value === undefined || value === null ? "" : String(value);
      if (text && ![...field.input.options].some((o) => o.value === text)) {
        field.input.append(el("option", { value: text }, text)); // e.g. a model no longer listed
      }
      field.input.value = text;
    } else {
      const shown = Array.isArray(value) ? value.join(",") : value;
      field.input.value = shown === undefined || shown === null
        || (field.kind.kind !== "image" && !(field.name in this.defaults) && value === field.property.default
            && !field.main && !field.required) ? "" : String(shown);
    }
  }

  /** The request body: main fields with a value, the others when they differ from their default. */
  values() {
    const body = {};
    for (const field of this.fields.values()) {
      const fallback = this.defaultOf(field);
      if (field.kind.kind === "flag") {
        const on = field.input.checked;
        if (field.main || on !== isYes(fallback) || field.name in this.defaults) body[field.name] = on ? "yes" : "no";
        continue;
      }
      const raw = field.input.value.trim();
      if (!raw) continue;
      const value = field.kind.kind === "number" ? Number(raw) : raw;
      if (field.main || field.required || String(value) !== String(fallback ?? "")) body[field.name] = value;
    }
    return body;
  }

  /** The browser's own check of ranges and required fields, reported on the first bad input. */
  check() {
    for (const field of this.fields.values()) {
      if (!field.input.checkValidity()) {
        const details = field.row.closest("details");
        if (details) details.open = true;
        field.input.reportValidity();
        return false;
      }
    }
    return true;
  }
}

/** A File as a data: URI. */
export function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
