// Validates one glTF asset (.glb or .gltf) with the Khronos glTF-Validator and prints the
// full validation report as JSON on stdout.
//
//   npm ci --prefix tests/js          # once: installs the pinned gltf-validator
//   node tests/js/validate.mjs model.glb
//
// Exit status: 0 when the report was produced (inspect report.issues.numErrors / numWarnings),
// 2 on usage or I/O errors. External resources (.gltf with separate .bin/.png) are resolved
// relative to the asset's folder.
import fs from "node:fs";
import path from "node:path";
import validator from "gltf-validator";

const file = process.argv[2];
if (!file) {
  console.error("usage: node validate.mjs <asset.glb|asset.gltf>");
  process.exit(2);
}
const fullpath = path.resolve(file);
let asset;
try {
  asset = fs.readFileSync(fullpath);
} catch (err) {
  console.error(`cannot read ${fullpath}: ${err.message}`);
  process.exit(2);
}

try {
  const report = await validator.validateBytes(new Uint8Array(asset), {
    uri: path.basename(fullpath),
    maxIssues: 0,
    externalResourceFunction: (uri) =>
      new Promise((resolve, reject) => {
        const target = path.resolve(path.dirname(fullpath), decodeURIComponent(uri));
        fs.readFile(target, (err, data) => (err ? reject(err.toString()) : resolve(new Uint8Array(data))));
      }),
  });
  process.stdout.write(JSON.stringify(report, null, 2) + "\n");
} catch (err) {
  console.error(`validator failed: ${err}`);
  process.exit(2);
}
