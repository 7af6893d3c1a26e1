// The independent client of vhdkit's Azure tests: Microsoft's JS SDK (@azure/storage-blob)
// against Azurite's development account. vhdkit_tests::azure runs it with NODE_PATH pointing
// at .ci/node/node_modules. Prints results on stdout (JSON where structured), errors on stderr
// with a non-zero exit.
//
//   node sdk.js container ENDPOINT NAME                   create a container
//   node sdk.js sas ENDPOINT CONTAINER BLOB PERMS SECS    blob URL with a SAS valid SECS seconds
//                                                         (negative: already expired)
//   node sdk.js ranges URL                                page ranges as [[start, end), ...]
//   node sdk.js props URL                                 {"length", "type", "metadata"}
//   node sdk.js download URL FILE                         the whole blob into FILE
//   node sdk.js upload URL FILE                           FILE as a new page blob, every byte
//                                                         sent (4 MiB pages, 8 in flight)
"use strict";
const fs = require("fs");
const {
  BlobServiceClient,
  PageBlobClient,
  StorageSharedKeyCredential,
  generateBlobSASQueryParameters,
  BlobSASPermissions,
} = require("@azure/storage-blob");

// Azurite's well-known development account (documented by Microsoft; not a secret).
const ACCOUNT = "devstoreaccount1";
const KEY =
  "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const cred = new StorageSharedKeyCredential(ACCOUNT, KEY);

async function main(argv) {
  const [cmd, ...a] = argv;
  switch (cmd) {
    case "container": {
      const svc = new BlobServiceClient(a[0], cred);
      await svc.getContainerClient(a[1]).createIfNotExists();
      return;
    }
    case "sas": {
      const [endpoint, container, blob, perms, secs] = a;
      const now = Date.now();
      const q = generateBlobSASQueryParameters(
        {
          containerName: container,
          blobName: blob,
          permissions: BlobSASPermissions.parse(perms),
          startsOn: new Date(now - 3600e3),
          expiresOn: new Date(now + Number(secs) * 1e3),
        },
        cred,
      );
      process.stdout.write(`${endpoint}/${container}/${blob}?${q.toString()}\n`);
      return;
    }
    case "ranges": {
      const c = new PageBlobClient(a[0]);
      const out = [];
      for await (const page of c.listPageRanges().byPage()) {
        for (const r of page.pageRange || []) out.push([r.start, r.end + 1]);
      }
      process.stdout.write(JSON.stringify(out) + "\n");
      return;
    }
    case "props": {
      const p = await new PageBlobClient(a[0]).getProperties();
      process.stdout.write(
        JSON.stringify({ length: p.contentLength, type: p.blobType, metadata: p.metadata }) + "\n",
      );
      return;
    }
    case "download": {
      await new PageBlobClient(a[0]).downloadToFile(a[1]);
      return;
    }
    case "upload": {
      const c = new PageBlobClient(a[0]);
      const size = fs.statSync(a[1]).size;
      await c.create(size);
      const fd = fs.openSync(a[1], "r");
      const step = 4 << 20;
      let next = 0;
      const worker = async () => {
        while (next < size) {
          const off = next;
          next += step;
          const len = Math.min(step, size - off);
          const buf = Buffer.alloc(len);
          fs.readSync(fd, buf, 0, len, off);
          await c.uploadPages(buf, off, len);
        }
      };
      await Promise.all(Array.from({ length: 8 }, worker));
      fs.closeSync(fd);
      return;
    }
    default:
      throw new Error(`unknown command ${cmd}`);
  }
}

main(process.argv.slice(2)).catch((e) => {
  process.stderr.write(`sdk.js: ${e.message || e}\n`);
  process.exit(1);
});
