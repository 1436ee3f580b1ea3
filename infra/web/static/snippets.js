// "Copy as curl / Python": the exact request the page sent (URL and JSON body), with the key read
// from the SDAPI_KEY environment variable instead of written out.

function shellQuote(text) {
  return `'${text.replace(/'/g, "'\\''")}'`;
}

export function curlSnippet(url, body) {
  return [
    `curl -s -X POST ${shellQuote(url)} \\`,
    `  -H "Authorization: Bearer $SDAPI_KEY" \\`,
    "  -H 'Content-Type: application/json' \\",
    `  --data-raw ${shellQuote(JSON.stringify(body))}`,
  ].join("\n");
}

/** A JSON value as a Python literal (JSON's string escapes are Python's too). */
export function pythonLiteral(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => `${inner}${pythonLiteral(v, inner)},`).join("\n")}\n${indent}]`;
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  return `{\n${entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pythonLiteral(v, inner)},`).join("\n")}\n${indent}}`;
}

export function pythonSnippet(url, body) {
  return [
    "import os",
    "",
    "import requests",
    "",
    `body = ${pythonLiteral(body)}`,
    "response = requests.post(",
    `    ${JSON.stringify(url)},`,
    '    headers={"Authorization": "Bearer " + os.environ["SDAPI_KEY"]},',
    "    json=body,",
    "    timeout=120,",
    ")",
    "print(response.json())",
  ].join("\n");
}
