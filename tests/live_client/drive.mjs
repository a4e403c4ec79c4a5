// Drives a live fhir_dmp server with fhir-kit-client, an independent FHIR client.
// Usage: node drive.mjs BASE_URL OUT_FILE
// env: PS_TOKEN, PATIENT_TOKEN, PID (a DMP the PS opened), INS_SYSTEM and INS (its INS),
//      NEW_PATIENT_JSON (a Patient to create), DOCS_JSON (DocumentReferences to deposit)
// Writes one JSON line per answer: {"step", "status", "body"}; the Python test checks every body
// against the R4 JSON schema and the scenario's expectations.
import { writeFileSync } from 'node:fs';
import { Client } from 'fhir-kit-client';

const [base, outFile] = process.argv.slice(2);
const out = [];
const ps = new Client({ baseUrl: base, bearerToken: process.env.PS_TOKEN });
const me = new Client({ baseUrl: base, bearerToken: process.env.PATIENT_TOKEN });

async function step(name, call) {
  try {
    const body = await call();
    out.push({ step: name, status: 200, body: body ?? null });
    return body;
  } catch (err) {
    if (!err.response) throw err;
    out.push({ step: name, status: err.response.status, body: err.response.data ?? null });
    return null;
  }
}

const anonymous = new Client({ baseUrl: base });
await step('metadata', () => anonymous.capabilityStatement());
await step('smart-configuration', () => anonymous.smartAuthMetadata().then(() => null));

await step('create Patient', () => ps.create({
  resourceType: 'Patient', body: JSON.parse(process.env.NEW_PATIENT_JSON),
}));
const pid = process.env.PID;     // created by the test, so that the patient's token can name it
const patient = await step('read Patient', () => ps.read({ resourceType: 'Patient', id: pid }));
await step('update Patient', () => ps.update({
  resourceType: 'Patient', id: pid, body: { ...patient, birthDate: '1985-03-13' },
}));
await step('patch Patient', () => ps.patch({
  resourceType: 'Patient', id: pid, jsonPatch: [{ op: 'replace', path: '/gender', value: 'female' }],
}));
await step('vread Patient', () => ps.vread({ resourceType: 'Patient', id: pid, version: '1' }));
await step('history Patient', () => ps.resourceHistory({ resourceType: 'Patient', id: pid }));
await step('type history Patient', () => ps.typeHistory({ resourceType: 'Patient' }));
await step('search Patient by INS', () => ps.search({
  resourceType: 'Patient', searchParams: { identifier: `${process.env.INS_SYSTEM}|${process.env.INS}` },
}));
await step('search Patient lenient', () => ps.search({
  resourceType: 'Patient', searchParams: { _id: pid, _totalMethod: 'accurate' },
}));
await step('read missing', () => ps.read({ resourceType: 'Patient', id: 'does-not-exist' }));

for (const doc of JSON.parse(process.env.DOCS_JSON)) {
  doc.subject = { reference: `Patient/${pid}` };
  await step('create DocumentReference', () => ps.create({ resourceType: 'DocumentReference', body: doc }));
}
let page = await step('search DocumentReference', () => ps.search({
  resourceType: 'DocumentReference', searchParams: { patient: pid, _count: 1 },
}));
while (page && (page.link || []).some((l) => l.relation === 'next')) {
  page = await step('next page', () => ps.nextPage({ bundle: page }));
}
await step('system history', () => ps.systemHistory());
await step('batch', () => ps.batch({
  body: { resourceType: 'Bundle', type: 'batch', entry: [{ request: { method: 'GET', url: `Patient/${pid}` } }] },
}));
await step('empty batch', () => ps.batch({ body: { resourceType: 'Bundle', type: 'batch' } }));
await step('transaction', () => ps.transaction({
  body: { resourceType: 'Bundle', type: 'transaction', entry: [{ request: { method: 'GET', url: `Patient/${pid}` } }] },
}));
await step('$validate', () => ps.operation({
  name: '$validate', resourceType: 'Patient', method: 'post', input: { resourceType: 'Patient', bogus: 1 },
}));
await step('StructureDefinition', () => anonymous.read({ resourceType: 'StructureDefinition', id: 'dmp-patient' }));
await step('SearchParameter by url', () => anonymous.search({
  resourceType: 'SearchParameter',
  searchParams: { url: 'https://fhir-dmp.example.org/fhir/SearchParameter/AuditEvent-purpose' },
}));

const journal = await step('journal', () => me.search({
  resourceType: 'AuditEvent', searchParams: { patient: `Patient/${pid}`, _count: 5 },
}));
const eventId = journal.entry[0].resource.id;
await step('vread AuditEvent', () => me.vread({ resourceType: 'AuditEvent', id: eventId, version: '1' }));
await step('history AuditEvent', () => me.resourceHistory({ resourceType: 'AuditEvent', id: eventId }));
await step('Consent', () => me.search({ resourceType: 'Consent', searchParams: { patient: pid } }));
await step('Communication', () => me.search({ resourceType: 'Communication', searchParams: { subject: `Patient/${pid}` } }));
await step('delete DocumentReference', () => ps.delete({ resourceType: 'DocumentReference', id: page.entry[0].resource.id }));

writeFileSync(outFile, out.map((o) => JSON.stringify(o)).join('\n') + '\n');
