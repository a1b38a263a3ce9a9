// Drives the published OpenMeter JavaScript SDK with the machine's Node.
// stdin: {"endpoint": url, "calls": [{"op": "meters.query", "args": [...]}]}
// stdout: one JSON list, per call {"ok": result} or {"error": {"class", "status", "message", "problem"}}.
// Arguments named in `dates` (paths like "1.from") are turned into Date objects, as a JS user passes them.
import { OpenMeter } from '@openmeter/sdk'

const chunks = []
for await (const chunk of process.stdin) chunks.push(chunk)
const request = JSON.parse(Buffer.concat(chunks).toString('utf8'))
const client = new OpenMeter({ baseUrl: request.endpoint })

function datesIn(args, paths) {
  for (const path of paths || []) {
    const keys = path.split('.')
    let target = args
    for (const key of keys.slice(0, -1)) target = target[key]
    const last = keys[keys.length - 1]
    if (target[last] !== undefined) target[last] = new Date(target[last])
  }
  return args
}

const out = []
for (const call of request.calls) {
  const [group, method] = call.op.split('.')
  try {
    const result = await client[group][method](...datesIn(call.args || [], call.dates))
    out.push({ ok: result === undefined ? null : result })
  } catch (error) {
    out.push({ error: { class: error.name, status: error.status ?? null, message: String(error.message),
                        problem: error.__raw ?? null } })
  }
}
process.stdout.write(JSON.stringify(out))
