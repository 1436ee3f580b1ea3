// DOM helpers. Every string a user or the server supplied goes in as text (textContent or an
// attribute value), never as markup: prompts and model names cannot inject HTML.

/** el("button", {class: "x", onclick: f}, "text", child) -> a new element. */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  setAttributes(node, attributes);
  append(node, children);
  return node;
}

const SVG = "http://www.w3.org/2000/svg";

/** An SVG element (the usage chart). */
export function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  setAttributes(node, attributes);
  append(node, children);
  return node;
}

function setAttributes(node, attributes) {
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(node.dataset, value);
    } else if (name === "text") {
      node.textContent = value;
    } else if (value === true) {
      node.setAttribute(name, "");
    } else {
      node.setAttribute(name, String(value));
    }
  }
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function replaceChildren(node, ...children) {
  node.replaceChildren();
  append(node, children);
}

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

let ids = 0;
/** A unique element id (labels point at their inputs by id). */
export function uid(prefix) {
  ids += 1;
  return `${prefix}-${ids}`;
}

/** Show a short status message in `node` (a live region). */
export function say(node, message, kind = "info") {
  node.textContent = message;
  node.dataset.kind = kind;
}

/** Tabs in a tablist: arrow keys move between them (the WAI-ARIA pattern); `onSelect(name)`. */
export function tabs(list, onSelect) {
  const buttons = $$("[role=tab]", list);
  const select = (button, focus) => {
    for (const other of buttons) {
      const chosen = other === button;
      other.setAttribute("aria-selected", String(chosen));
      other.tabIndex = chosen ? 0 : -1;
      const panel = document.getElementById(other.getAttribute("aria-controls") || "");
      if (panel) panel.hidden = !chosen;
    }
    if (focus) button.focus();
    onSelect(button.dataset.name);
  };
  for (const button of buttons) {
    button.addEventListener("click", () => select(button, false));
    button.addEventListener("keydown", (event) => {
      const at = buttons.indexOf(button);
      const next = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: buttons.length - 1 }[event.key];
      if (next === undefined) return;
      event.preventDefault();
      select(buttons[(next + buttons.length) % buttons.length], true);
    });
  }
  return (name) => select(buttons.find((b) => b.dataset.name === name) || buttons[0], false);
}

/** Copy text to the clipboard; false when the browser refuses (the caller shows the text instead). */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    return false;
  }
}
