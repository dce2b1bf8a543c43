// Validates Prometheus Operator resources (PodMonitor, PrometheusRule) offline, for `make deploy-check`.
//
//   NODE_PATH=.deploy-tools/node/node_modules node deploy/checks/validate_crds.cjs CRDS.json...
//
// CRDS.json: a JSON list of resources (written by manifests.py split). Two passes, both against the models of
// the pinned npm package @kubernetes-models/prometheus-operator (generated from the operator's CRDs):
//  1. its JSON Schema validators (required fields, types, enums, duration and other patterns);
//  2. its TypeScript types, compiled with the pinned `typescript`: an object literal with a field the type does
//     not have fails, which the schema pass lets through. This stands in for the API server's strict field
//     validation (what kubernetes-validate --strict does for core resources): a misspelt field such as
//     `podMetricEndpoints` or `interval` in the wrong place would otherwise be silently dropped.
// A kind not listed in MODELS is an error, never skipped.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const ts = require("typescript");
const v1 = require("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1");

const MODELS = {
  "monitoring.coreos.com/v1 PodMonitor": { model: v1.PodMonitor, type: "IPodMonitor", module: "PodMonitor" },
  "monitoring.coreos.com/v1 PrometheusRule": { model: v1.PrometheusRule, type: "IPrometheusRule", module: "PrometheusRule" },
};
const PKG = "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

function main(files) {
  if (files.length === 0) {
    console.error("usage: validate_crds.cjs CRDS.json...");
    return 2;
  }
  const problems = [];
  const resources = [];
  for (const file of files) {
    for (const res of JSON.parse(fs.readFileSync(file, "utf8"))) {
      const name = `${file}: ${res.kind}/${res.metadata && res.metadata.name}`;
      const entry = MODELS[`${res.apiVersion} ${res.kind}`];
      if (!entry) {
        problems.push(`${name}: no model for apiVersion ${res.apiVersion} kind ${res.kind}`);
        continue;
      }
      try {
        new entry.model(res).validate();
      } catch (err) {
        problems.push(`${name}: schema: ${err.message}`);
      }
      resources.push({ name, entry, res });
    }
  }

  // One line per resource, so a diagnostic's line names the resource.
  const imports = [...new Set(resources.map((r) => r.entry.module))].map(
    (m) => `import type { ${MODELS[Object.keys(MODELS).find((k) => MODELS[k].module === m)].type} } from "${PKG}/${m}";`,
  );
  const body = resources.map((r, i) => `export const r${i}: ${r.entry.type} = ${JSON.stringify(r.res)};`);
  const source = [...imports, ...body].join("\n") + "\n";
  const nodeModules = path.resolve(path.dirname(require.resolve("typescript/package.json")), "..");
  const fileName = path.join(nodeModules, "..", "crd-types-check.ts");
  fs.writeFileSync(fileName, source);
  const program = ts.createProgram([fileName], {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    module: ts.ModuleKind.CommonJS,
    moduleResolution: ts.ModuleResolutionKind.Node10,
    target: ts.ScriptTarget.ES2020,
    types: [],
  });
  for (const diag of ts.getPreEmitDiagnostics(program)) {
    const message = ts.flattenDiagnosticMessageText(diag.messageText, "\n");
    if (diag.file && diag.file.fileName === fileName && diag.start !== undefined) {
      const line = diag.file.getLineAndCharacterOfPosition(diag.start).line - imports.length;
      const where = resources[line] ? resources[line].name : fileName;
      problems.push(`${where}: type: ${message}`);
    } else {
      problems.push(`${diag.file ? diag.file.fileName : "typescript"}: ${message}`);
    }
  }

  for (const p of problems) console.error(p);
  if (problems.length) return 1;
  for (const r of resources) console.log(`${r.name}: valid (schema and fields)`);
  return 0;
}

process.exitCode = main(process.argv.slice(2));
