// node answer.mjs EXPORT_DIR fp32|int4 QUESTION IMAGE... -> JSON list of generated token ids.
// Opens an edgevlm export as a user of transformers.js would: AutoProcessor and
// LlavaForConditionalGeneration (Idefics3- or SmolVLMForConditionalGeneration for SmolVLM exports,
// Qwen2VL- or Qwen2_5_VLForConditionalGeneration for Qwen2-VL ones) from the local folder, the chat
// template the folder carries, greedy decoding; no file is patched and nothing is passed by hand.
// A Qwen2-VL QUESTION holds the image as Qwen's processor takes it:
// <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to the image's tokens.
import { AutoProcessor, Idefics3ForConditionalGeneration, LlavaForConditionalGeneration,
  Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, RawImage,
  SmolVLMForConditionalGeneration, env }
  from '@huggingface/transformers';
import fs from 'node:fs';
import path from 'node:path';

const [dir, precision, question, ...images] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(dir)) + '/';
const name = path.basename(path.resolve(dir));
const processor = await AutoProcessor.from_pretrained(name);
// edgevlm's int4 export: int4 decoder and embedding (_q4), int8 vision encoder (_int8)
const dtype = precision === 'int4'
  ? { embed_tokens: 'q4', vision_encoder: 'int8', decoder_model_merged: 'q4' } : 'fp32';
// the model class a user picks for the folder's model_type (SmolVLM exports: idefics3, or
// smolvlm for SmolVLM2's classes), and whether its processor takes (text, images) first
const CLASSES = {
  idefics3: [Idefics3ForConditionalGeneration, true],
  smolvlm: [SmolVLMForConditionalGeneration, true],
  qwen2_vl: [Qwen2VLForConditionalGeneration, true],
  qwen2_5_vl: [Qwen2_5_VLForConditionalGeneration, true],
};
const modelType = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8')).model_type;
const [ModelClass, textFirst] = CLASSES[modelType] ?? [LlavaForConditionalGeneration, false];
const model = await ModelClass.from_pretrained(name, { dtype, device: 'cpu' });
const out = [];
for (const file of images) {
  const text = processor.apply_chat_template([{ role: 'user', content: question }],
                                             { add_generation_prompt: true });
  const image = await RawImage.read(file);
  // Idefics3Processor and Qwen2VLProcessor take (text, images); LlavaProcessor (images, text)
  const inputs = textFirst ? await processor(text, [image])
    : await processor(image, text);
  const ids = await model.generate({ ...inputs, max_new_tokens: 8, do_sample: false });
  const n = inputs.input_ids.dims[1];
  out.push({ prompt_tokens: n, ids: Array.from(ids.slice(null, [n, null]).data, Number) });
}
console.log(JSON.stringify(out));
